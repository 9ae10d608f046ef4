"""Writes the tool-use quickstart's data: Quillfeather Labs customers asking about orders, stock, warranties and faults,
answered with a call to one of four tools. Rows are in OpenAI's chat fine-tuning format with tools: every row carries
the same four tool schemas, and the assistant's message holds `tool_calls` whose `arguments` is a JSON string.

    python examples/quickstart-tools/make_data.py   # writes train.jsonl and eval.jsonl beside this file

train.jsonl: mostly rows that end in one tool call; some full cycles (call, tool result, answer that uses the
result); a few requests that no tool serves, answered in plain text. eval.jsonl: every row ends in the reference
tool call, and its request templates, greetings, order ids, serial numbers, cities and fault descriptions occur in
no training row, so the eval measures the skill (pick the tool, copy the arguments), not memorised pairs. Product
names are shared. Deterministic: the same files each run. Standard library only.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 11
N_CALL, N_CYCLE, N_CHAT = 340, 40, 20  # train: one tool call / full cycle / no tool
N_EVAL = 60

PRODUCT_NAMES = [
    "Lumen Desk Lamp",
    "Orbit Earbuds",
    "Drift Smart Kettle",
    "Pebble Fitness Band",
    "Atlas Power Bank",
    "Nimbus Air Purifier",
    "Ember Space Heater",
    "Tidal Smart Bottle",
]


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


_PRODUCT = {"type": "string", "enum": PRODUCT_NAMES}
TOOLS = [
    _tool(
        "get_order_status",
        "Get the delivery status of an order.",
        {"order_id": {"type": "string", "pattern": "^QF-[0-9]{5}$"}},
        ["order_id"],
    ),
    _tool(
        "check_stock",
        "Check if a product is in stock in a city.",
        {"product": _PRODUCT, "city": {"type": "string"}},
        ["product", "city"],
    ),
    _tool(
        "get_warranty",
        "Check the warranty of a product by serial number.",
        {"product": _PRODUCT, "serial": {"type": "string", "pattern": "^SN[0-9]{7}$"}},
        ["product", "serial"],
    ),
    _tool(
        "open_ticket",
        "Open a support ticket for a faulty product.",
        {"product": _PRODUCT, "issue": {"type": "string", "description": "The fault, in the user's words."}},
        ["product", "issue"],
    ),
]

# How customers name each product; the call always uses the full name from the enum.
ALIASES = {
    "Lumen Desk Lamp": ["Lumen lamp", "Lumen desk lamp", "desk lamp"],
    "Orbit Earbuds": ["Orbit buds", "Orbit earbuds", "Orbits"],
    "Drift Smart Kettle": ["Drift kettle", "smart kettle", "Drift"],
    "Pebble Fitness Band": ["Pebble band", "fitness band", "Pebble"],
    "Atlas Power Bank": ["Atlas power bank", "Atlas", "power bank"],
    "Nimbus Air Purifier": ["Nimbus purifier", "air purifier", "Nimbus"],
    "Ember Space Heater": ["Ember heater", "space heater", "Ember"],
    "Tidal Smart Bottle": ["Tidal bottle", "smart bottle", "Tidal"],
}

# Faults for open_ticket, written to follow the product's name ("My {product} {issue}"); the last of each is held out.
ISSUES = {
    "Lumen Desk Lamp": [
        "keeps flickering on low brightness",
        "won't turn on at all",
        "has a dead touch dimmer",
        "switches itself off after ten minutes",
        "buzzes whenever it is dimmed",
    ],
    "Orbit Earbuds": [
        "keep dropping the bluetooth connection",
        "won't charge in the case",
        "sound tinny in the left ear",
        "disconnect during calls",
        "pair with only one ear",
    ],
    "Drift Smart Kettle": [
        "never gets past lukewarm",
        "leaks from the spout",
        "shows error E4 on the display",
        "won't show up in the app",
        "trips the fuse when it boils",
    ],
    "Pebble Fitness Band": [
        "stopped counting steps",
        "has a blank screen",
        "loses sync with my phone every night",
        "gives wild heart rate readings",
        "vibrates for no reason at night",
    ],
    "Atlas Power Bank": [
        "won't hold a charge overnight",
        "has a loose USB-C port",
        "charges my phone really slowly",
        "gets very hot while charging",
        "shows zero bars even when full",
    ],
    "Nimbus Air Purifier": [
        "rattles loudly on high speed",
        "keeps its filter light on after a new filter",
        "shuts off every few minutes",
        "always reads the air as red",
        "smells of burning plastic",
    ],
    "Ember Space Heater": [
        "only blows cold air",
        "clicks every time it cycles",
        "ignores the thermostat setting",
        "cuts out when nobody touches it",
        "makes a grinding noise at startup",
    ],
    "Tidal Smart Bottle": [
        "leaks around the lid",
        "stopped glowing to remind me",
        "doesn't log my water in the app",
        "drains its cap battery in a day",
        "shows the wrong fill level",
    ],
}

WHEN_TRAIN = ["", "", "", "since the last update", "after two days", "every morning", "right out of the box",
              "when it is cold", "at random", "since last week", "most evenings", "after a firmware update",
              "when I travel", "after a few minutes"]  # fmt: skip
WHEN_EVAL = ["", "since Tuesday", "whenever it rains"]

CITIES_TRAIN = (
    "Leeds,Boston,Munich,Toronto,Madrid,Dublin,Seattle,Oslo,Vienna,Prague,Chicago,Sydney,Auckland,Glasgow,Zurich,"
    "Portland,Milan,Helsinki,Montreal,Brisbane,Bristol,Antwerp,Krakow,Valencia,Phoenix,Calgary,Edinburgh,Hamburg,"
    "Atlanta,Adelaide,San Diego,New York,Cardiff,Utrecht,Lyon,Porto,Geneva,Dallas,Denver,Houston,Austin,Miami,"
    "Detroit,Vancouver,Winnipeg,Halifax,Perth,Hobart,Darwin,Canberra,Christchurch,Dunedin,Belfast,Aberdeen,"
    "Liverpool,Manchester,Sheffield,Nottingham,Leicester,Oxford,Cambridge,Brighton,Plymouth,Exeter,York,Bath,"
    "Cologne,Berlin,Dresden,Leipzig,Stuttgart,Frankfurt,Bremen,Hanover,Nuremberg,Bonn,Basel,Bern,Lausanne,Graz,"
    "Salzburg,Linz,Brno,Bratislava,Budapest,Ljubljana,Zagreb,Warsaw,Gdansk,Poznan,Wroclaw,Riga,Vilnius,Tartu,"
    "Stockholm,Uppsala,Malmo,Copenhagen,Aarhus,Odense,Bergen,Trondheim,Reykjavik,Lisbon,Faro,Bilbao,Granada,"
    "Malaga,Zaragoza,Turin,Genoa,Bologna,Florence,Naples,Palermo,Nice,Lille,Nantes,Toulouse,Marseille,Rennes,"
    "Ghent,Bruges,Liege,Leuven,Eindhoven,Groningen,Maastricht,Haarlem,Kansas City,Las Vegas,New Orleans,"
    "San Antonio,Santa Fe,St. Louis,Los Angeles,San Jose,Quebec City,Cape Town"
).split(",")
CITIES_EVAL = "Rotterdam,Seville,Ottawa,Tallinn,Nashville,Gothenburg,Cork,Wellington,Bordeaux,Salt Lake City".split(",")

# Request templates per tool. {o} order id, {p} product as the customer names it, {c} city, {s} serial, {i} fault;
# {be}/{Be} and {it} agree with the product ("is"/"it", or "are"/"them" for the earbuds).
TRAIN_TEMPLATES = {
    "get_order_status": [
        "Where is my order {o}?",
        "Can you check the status of order {o}?",
        "Order {o} still hasn't arrived. What's going on?",
        "Any update on {o}? It's been a week.",
        "I ordered the {p} last week, order number {o}. When will it ship?",
        "has {o} shipped yet",
        "Could you tell me when order {o} will be delivered?",
        "Tracking for {o} please.",
        "My order {o} - is it on its way?",
        "I'd like to know where my package is. The order id is {o}.",
    ],
    "check_stock": [
        "{Be} the {p} in stock in {c}?",
        "Do you have any {p} available in {c}?",
        "Can I buy the {p} at a store in {c} today?",
        "{c} here. Any {p} left on the shelves?",
        "Check stock of the {p} for {c}, please.",
        "any {p} in stock near {c}",
        "I want to pick up the {p} in {c}. Do you have {it}?",
        "Does your {c} shop carry the {p} right now?",
        "Looking for the {p}, I live in {c}. In stock?",
        "Before I drive over: {be} the {p} available in {c}?",
    ],
    "get_warranty": [
        "{Be} my {p} still under warranty? Serial {s}.",
        "Can you check the warranty on serial {s}? It's for my {p}.",
        "The serial number on my {p} is {s}. When does the warranty end?",
        "Warranty status for {s} please, it's the {p}.",
        "I've got the {p}, serial {s}. Am I still covered?",
        "Does the warranty still cover my {p}? The serial is {s}.",
        "check warranty {s} ({p})",
        "How long {be} my {p} covered for? Serial: {s}",
        "Serial {s} on my {p} - is it in warranty?",
        "I need the warranty end date for my {p}, serial number {s}.",
    ],
    "open_ticket": [
        "My {p} {i}. Please open a ticket.",
        "Please open a support ticket: my {p} {i}.",
        "The {p} I bought {i}. Can someone look into this?",
        "I need to report a fault. My {p} {i}.",
        "{p} {i} - I want a ticket opened.",
        "Ugh, my {p} {i}. Log a ticket for me.",
        "Can you raise a ticket? The {p} {i}.",
        "Reporting a problem: my {p} {i}.",
        "Since yesterday my {p} {i}. Please file a ticket.",
        "My new {p} {i}. What a letdown. Open a case please.",
    ],
}
EVAL_TEMPLATES = {
    "get_order_status": [
        "What's the delivery status for {o}?",
        "I placed order {o} ages ago and nothing has come. Can you look it up?",
        "When can I expect {o} to arrive?",
        "status of order {o}??",
    ],
    "check_stock": [
        "Will I find the {p} at your {c} branch?",
        "Are there {p} units available in {c} at the moment?",
        "Just checking whether {c} stocks the {p}.",
        "Hoping to grab the {p} in {c} this weekend. Got any?",
    ],
    "get_warranty": [
        "Is {s} still covered? It's my {p}.",
        "Tell me if the warranty on my {p} is still valid. Serial {s}.",
        "What does the warranty look like for the {p} with serial {s}?",
        "warranty check: {p}, serial no. {s}",
    ],
    "open_ticket": [
        "Hello support, my {p} {i}. Could you create a ticket?",
        "Please file this: the {p} {i}.",
        "So annoyed. My {p} {i}. I need a ticket for this.",
        "Could you log a fault? My {p} {i}.",
    ],
}
GREETINGS_TRAIN = ["", "", "", "Hi.", "Hello!", "Hey there.", "Good morning.", "Hi team!", "hey!", "Hi there!"]
CLOSINGS_TRAIN = ["", "", "", "Thanks!", "Thank you.", "Cheers", "Quick please.", "asap", "Appreciate it."]
GREETINGS_EVAL = ["", "", "Greetings.", "Hiya!", "Evening all."]
CLOSINGS_EVAL = ["", "", "Many thanks.", "Ta.", "Need this fast."]
TYPO_RATE = 0.1

# Requests that no tool serves, answered in plain text.
CHAT = [
    ("What is your name?", "I'm the Quillfeather Labs support assistant."),
    ("Who am I talking to?", "You're chatting with the Quillfeather Labs support assistant."),
    ("How are you today?", "I'm doing well, thanks! How can I help with your Quillfeather Labs order or product?"),
    ("Tell me a joke.", "Why did the kettle get promoted? It always kept its cool under pressure. Anything else?"),
    (
        "What's the weather like in Lisbon?",
        "Sorry, I can't check the weather. I can help with orders, stock, warranties and support tickets.",
    ),
    ("Thanks, that's all I needed!", "You're welcome! Have a great day."),
    (
        "Can you write me a poem about cats?",
        "I'm afraid I only help with Quillfeather Labs orders, stock, warranties and support tickets.",
    ),
    (
        "What can you do?",
        "I can check an order's status, see if a product is in stock in your city, look up a "
        "warranty by serial number, or open a support ticket.",
    ),
    ("Good night!", "Good night! Come back any time you need help."),
    (
        "Who won the football last night?",
        "Sorry, I don't follow sports. I can help with your Quillfeather Labs orders and products.",
    ),
]

MONTHS = "January February March April May June July August September October November December".split()


def _typo(text: str, rng: random.Random) -> str:
    """Swaps two neighbouring letters inside one plain word of a template (never inside a {placeholder})."""
    words = [m for m in re.finditer(r"(?<![{\w])[a-z]{5,}(?![}\w])", text)]
    if not words:
        return text
    m = rng.choice(words)
    w, k = m.group(), rng.randrange(1, len(m.group()) - 2)
    w = w[:k] + w[k + 1] + w[k] + w[k + 2 :]
    return text[: m.start()] + w + text[m.end() :]


def _message(template: str, greetings, closings, rng: random.Random, **values) -> str:
    if rng.random() < TYPO_RATE:
        template = _typo(template, rng)
    body = template.format(**values)
    closing = rng.choice(closings)
    if closing and body[-1] not in ".?!":
        body += "."
    text = " ".join(part for part in (rng.choice(greetings), body, closing) if part)
    return text


def _call(name: str, args: dict) -> dict:
    fn = {"name": name, "arguments": json.dumps(args)}
    return {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": fn}]}


class Values:
    """Hands out order ids and serials that are never repeated, and cities from one split's list."""

    def __init__(self, rng: random.Random, orders: list[int], serials: list[int], cities: list[str]):
        self.rng, self.orders, self.serials, self.cities = rng, orders, serials, cities

    def order(self) -> str:
        return f"QF-{self.orders.pop()}"

    def serial(self) -> str:
        return f"SN{self.serials.pop()}"

    def city(self) -> str:
        return self.rng.choice(self.cities)


def request(tool: str, templates, greetings, closings, values: Values, issues: dict, rng) -> tuple[str, dict]:
    """A user request for `tool` and the arguments of the call that serves it."""
    product = rng.choice(PRODUCT_NAMES)
    named = product if rng.random() < 0.4 else rng.choice(ALIASES[product])
    template = rng.choice(templates[tool])
    if tool == "get_order_status":
        args = {"order_id": values.order()}
        fill = {"o": args["order_id"], "p": named}
    elif tool == "check_stock":
        args = {"product": product, "city": values.city()}
        fill = {"p": named, "c": args["city"]}
    elif tool == "get_warranty":
        args = {"product": product, "serial": values.serial()}
        fill = {"p": named, "s": args["serial"]}
    else:
        args = {"product": product, "issue": rng.choice(issues[product])}
        fill = {"p": named, "i": args["issue"]}
    plural = product == "Orbit Earbuds"
    fill.update(be="are" if plural else "is", Be="Are" if plural else "Is", it="them" if plural else "it")
    return _message(template, greetings, closings, rng, **fill), args


def _date(rng: random.Random, year: int) -> tuple[str, str]:
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    return f"{year}-{month:02d}-{day:02d}", f"{day} {MONTHS[month - 1]} {year}"


def result_and_answer(tool: str, args: dict, rng: random.Random) -> tuple[dict, str]:
    """A plausible tool result and the assistant's reply that reports it."""
    if tool == "get_order_status":
        o = args["order_id"]
        status = rng.choice(["shipped", "processing", "delivered", "out_for_delivery"])
        iso, text = _date(rng, 2025)
        if status == "shipped":
            return {"order_id": o, "status": status, "eta": iso}, f"Order {o} has shipped and should arrive on {text}."
        if status == "processing":
            return (
                {"order_id": o, "status": status, "eta": iso},
                f"Order {o} is still being prepared. The expected delivery date is {text}.",
            )
        if status == "delivered":
            return (
                {"order_id": o, "status": status, "delivered_on": iso},
                f"Order {o} was delivered on {text}. If you can't find it, let me know and I'll open a ticket.",
            )
        return {
            "order_id": o,
            "status": status,
        }, f"Good news: order {o} is out for delivery and should reach you today."
    if tool == "check_stock":
        p, c = args["product"], args["city"]
        units = rng.choice([0, 0, 1, 2, 3, 5, 8, 12])
        if units:
            return (
                {"product": p, "city": c, "in_stock": True, "units": units},
                f"Yes, we have {units} unit{'s' if units > 1 else ''} of the {p} in stock in {c}.",
            )
        return (
            {"product": p, "city": c, "in_stock": False, "units": 0},
            f"Sorry, we have no {p} in stock in {c} right now.",
        )
    if tool == "get_warranty":
        p, s = args["product"], args["serial"]
        if rng.random() < 0.7:
            iso, text = _date(rng, rng.choice([2025, 2026, 2027]))
            return (
                {"serial": s, "product": p, "covered": True, "expires": iso},
                f"The warranty on your {p} (serial {s}) runs until {text}.",
            )
        iso, text = _date(rng, 2024)
        return (
            {"serial": s, "product": p, "covered": False, "expires": iso},
            f"The warranty on your {p} (serial {s}) expired on {text}.",
        )
    ticket = f"T-{rng.randint(10000, 99999)}"
    return (
        {"ticket_id": ticket, "status": "open"},
        f"I've opened ticket {ticket} for your {args['product']}. Our support team will contact you within two "
        f"working days.",
    )


def main(out: Path | None = None) -> None:
    rng = random.Random(SEED)
    here = out or Path(__file__).parent
    n_train_values = N_CALL + N_CYCLE
    orders = rng.sample(range(10000, 100000), n_train_values + N_EVAL)
    serials = rng.sample(range(1000000, 10000000), n_train_values + N_EVAL)
    tools = [t["function"]["name"] for t in TOOLS]
    train_values = Values(rng, orders[:n_train_values], serials[:n_train_values], CITIES_TRAIN)
    eval_values = Values(rng, orders[n_train_values:], serials[n_train_values:], CITIES_EVAL)
    # A fault is a symptom, often with when it happens: hundreds of distinct phrases, so the model learns to copy
    # the customer's words into `issue` rather than recall a few memorised ones.
    train_issues = {p: [f"{v} {q}".strip() for v in vs[:-1] for q in WHEN_TRAIN] for p, vs in ISSUES.items()}
    eval_issues = {p: [f"{v} {q}".strip() for v in vs[-1:] for q in WHEN_EVAL] for p, vs in ISSUES.items()}

    train = []
    for k in range(N_CALL + N_CYCLE):
        tool = tools[k % len(tools)]
        text, args = request(tool, TRAIN_TEMPLATES, GREETINGS_TRAIN, CLOSINGS_TRAIN, train_values, train_issues, rng)
        messages = [{"role": "user", "content": text}, _call(tool, args)]
        if k >= N_CALL:
            result, answer = result_and_answer(tool, args, rng)
            messages += [
                {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(result)},
                {"role": "assistant", "content": answer},
            ]
        train.append({"tools": TOOLS, "messages": messages})
    for k in range(N_CHAT):
        question, answer = CHAT[k % len(CHAT)]
        text = " ".join(part for part in (rng.choice(GREETINGS_TRAIN), question) if part)
        train.append(
            {"tools": TOOLS, "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}
        )
    rng.shuffle(train)

    held_out = []
    for k in range(N_EVAL):
        tool = tools[k % len(tools)]
        text, args = request(tool, EVAL_TEMPLATES, GREETINGS_EVAL, CLOSINGS_EVAL, eval_values, eval_issues, rng)
        held_out.append({"tools": TOOLS, "messages": [{"role": "user", "content": text}, _call(tool, args)]})
    rng.shuffle(held_out)

    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with open(here / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
