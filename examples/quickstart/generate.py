"""Generate the quickstart dataset: support messages -> JSON tickets, company facts Q&A, how-to preference pairs.

Usage:
    python examples/quickstart/generate.py [--out DIR]

The output is fully determined by SEED: running this script again rewrites every file byte-for-byte.
Only the standard library is used, so the data can be rebuilt without installing anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections import Counter
from pathlib import Path

SEED = 20240611
COMPANY = "Quillfeather Labs"

SYSTEM_PROMPT = (
    "Convert the customer message into a support ticket. "
    'Reply with JSON only: {"product", "severity", "intent", "order_id", "summary"}.'
)

N_TRAIN = 1200
EVAL_PER_COMBO = 5
HELD_OUT_FRACTION = 0.15
MIN_WORDS, MAX_WORDS = 20, 70

TASK_TRAIN = "train.jsonl"
TASK_EVAL = "eval.jsonl"
KNOWLEDGE_TRAIN = "knowledge_train.jsonl"
KNOWLEDGE_EVAL = "knowledge_eval.jsonl"
PREFERENCE_TRAIN = "preference_train.jsonl"
PREFERENCE_EVAL = "preference_eval.jsonl"
STATS = "stats.json"

# --------------------------------------------------------------------------------------------------
# Task split: products, intents, severities and the wording that signals each of them.
# --------------------------------------------------------------------------------------------------

# Problem clauses start with "the " so they read naturally after "and"/"because"/"since" in a message;
# the ticket summary drops that article.
PRODUCTS: list[dict] = [
    {
        "name": "Lumen Desk Lamp",
        "aliases": ["Lumen lamp", "Lumen desk lamp"],
        "problems": [
            "the lamp flickers at every brightness level",
            "the touch dimmer stopped responding",
            "the base is cracked",
            "the light turns off by itself after a few minutes",
        ],
        "how_to": [
            "set a warm light schedule",
            "pair the lamp with the Roost app",
            "turn off the auto-dimming",
        ],
    },
    {
        "name": "Orbit Earbuds",
        "aliases": ["Orbit buds", "Orbit earbuds"],
        "problems": [
            "the left earbud stopped charging",
            "the sound keeps cutting out",
            "the charging case will not close",
            "the microphone sounds muffled on calls",
        ],
        "how_to": [
            "pair the earbuds with a second phone",
            "update the earbud firmware",
            "change the touch controls",
        ],
    },
    {
        "name": "Drift Smart Kettle",
        "aliases": ["Drift kettle", "smart kettle"],
        "problems": [
            "the kettle will not heat past lukewarm",
            "the lid leaks when pouring",
            "the display shows an E4 error",
            "the app cannot find the kettle",
        ],
        "how_to": [
            "set the water temperature to 80 degrees",
            "descale the kettle",
            "schedule the kettle to boil in the morning",
        ],
    },
    {
        "name": "Pebble Fitness Band",
        "aliases": ["Pebble band", "fitness band"],
        "problems": [
            "the strap snapped after a week",
            "the heart rate readings are way off",
            "the screen stays black",
            "the band will not sync with the app",
        ],
        "how_to": [
            "track a swim workout",
            "change the watch face",
            "sync sleep data to a phone",
        ],
    },
    {
        "name": "Atlas Power Bank",
        "aliases": ["Atlas battery", "Atlas power bank"],
        "problems": [
            "the power bank will not hold a charge",
            "the USB-C port is loose",
            "the power bank charges phones very slowly",
            "the battery indicator is stuck at zero",
        ],
        "how_to": [
            "charge two devices at once",
            "check the remaining battery level",
            "use pass-through charging",
        ],
    },
    {
        "name": "Nimbus Air Purifier",
        "aliases": ["Nimbus purifier", "air purifier"],
        "problems": [
            "the fan makes a loud rattling noise",
            "the filter light stays on after a new filter",
            "the purifier keeps shutting off",
            "the air quality sensor always reads red",
        ],
        "how_to": [
            "replace the filter",
            "turn on night mode",
            "connect the purifier to Wi-Fi",
        ],
    },
    {
        "name": "Ember Space Heater",
        "aliases": ["Ember heater", "space heater"],
        "problems": [
            "the heater blows only cold air",
            "the heater clicks loudly every time it cycles",
            "the thermostat ignores the set temperature",
            "the tip-over switch cuts power constantly",
        ],
        "how_to": [
            "set the eco mode",
            "use the shut-off timer",
            "lock the control panel",
        ],
    },
    {
        "name": "Tidal Smart Bottle",
        "aliases": ["Tidal bottle", "smart bottle"],
        "problems": [
            "the cap light stopped glowing",
            "the bottle leaks from the lid",
            "the app does not log water intake",
            "the battery in the cap dies within a day",
        ],
        "how_to": [
            "set a daily hydration goal",
            "reset the cap sensor",
            "clean the bottle without damaging the cap",
        ],
    },
]

INTENTS = [
    "refund",
    "replacement",
    "technical_issue",
    "shipping_delay",
    "billing_question",
    "cancel_order",
    "how_to",
]

SEVERITIES = ["low", "medium", "high", "urgent"]

# The last clause of every summary names what the customer wants, so it follows from the intent alone.
WANTS = {
    "refund": "customer wants a refund",
    "replacement": "customer wants a replacement",
    "technical_issue": "customer needs troubleshooting help",
    "shipping_delay": "customer asks for a delivery update",
    "billing_question": "customer asks for a billing review",
    "cancel_order": "customer wants to cancel the order",
    "how_to": "customer asks for instructions",
}

# Details that do not depend on the product: (clause used in the message, phrase used in the summary).
SHIPPING_DETAILS = [
    ("it still hasn't arrived after two weeks", "not delivered after two weeks"),
    ("the tracking page hasn't updated in five days", "tracking not updated in five days"),
    ("the package seems stuck at the local depot", "package stuck at the local depot"),
    ("the delivery date keeps getting pushed back", "delivery date keeps slipping"),
    ("the courier marked it as delivered but nothing came", "marked delivered but not received"),
]

BILLING_DETAILS = [
    ("I was charged twice for the same order", "charged twice for one order"),
    ("the amount on my card is higher than the checkout price", "charged more than the checkout price"),
    ("my discount code was not applied", "discount code not applied"),
    ("I was billed for an extended warranty I never chose", "billed for an unrequested extended warranty"),
    ("the charge shows up under a company name I don't recognize", "charge listed under an unfamiliar name"),
]

CANCEL_DETAILS = [
    ("I ordered it by mistake", "ordered by mistake"),
    ("I picked the wrong color", "wrong color ordered"),
    ("a friend is giving me one instead", "no longer needed"),
    ("I accidentally placed the same order twice", "duplicate order placed"),
    ("the delivery estimate is too late for me", "delivery estimate too late"),
]

# {p}: product mention, {d}: detail clause, {D}: the same clause starting with a capital letter.
# Templates carry no urgency words of their own: severity comes only from the cue sentences below.
TEMPLATES = {
    "refund": [
        "I bought the {p} and {d}. I would like a full refund, please.",
        "My {p} has a problem: {d}. I'd like to return it and get my money back.",
        "I'm writing about my {p}. {D}, so I want to send it back for a refund.",
        "Since {d}, I no longer want the {p}. Please refund the purchase.",
        "Could you process a refund for my {p}? {D} and I don't want a replacement.",
        "The {p} I received is not working properly: {d}. I want a refund rather than a new unit.",
        "I'd like to request a refund for the {p} because {d}.",
        "Please refund my {p}. {D}, and I'd rather have my money back.",
    ],
    "replacement": [
        "My {p} arrived recently and {d}. Could you send me a replacement unit?",
        "I'm having trouble with my {p}: {d}. I'd like a new one sent out, not a refund.",
        "The {p} I got is faulty because {d}. Please ship me a replacement.",
        "Could you swap my {p} for a working one? {D}.",
        "I want to exchange my {p} for a new unit since {d}.",
        "I really like the {p}, but {d}. Can you send a replacement?",
        "Requesting a replacement for my {p}: {d}.",
        "My {p} is defective: {d}. I'd like it replaced with a new one.",
    ],
    "technical_issue": [
        "I need some help with my {p}. {D}. Is there something I can try to fix it?",
        "Can you help me troubleshoot my {p}? {D}.",
        "My {p} has started acting up: {d}. What should I do?",
        "Something is wrong with my {p}: {d}. I've already restarted it twice. Any ideas?",
        "I'm not sure if I'm doing something wrong with my {p}, but {d}. How can I fix this?",
        "Technical question about the {p}: {d}. Is there a setting or update that fixes this?",
        "My {p} isn't working right because {d}. I'd like to get it working again rather than return it.",
        "I'd like some troubleshooting advice for the {p}. {D}.",
    ],
    "shipping_delay": [
        "I ordered the {p} and {d}. Can you tell me where it is?",
        "Where is my {p}? {D}.",
        "I'm still waiting on my {p} delivery: {d}. Could you check on it?",
        "There's a problem with my {p} delivery: {d}. When will it actually arrive?",
        "Could you look into the shipment of my {p}? {D}.",
        "I'm checking on the delivery status of the {p} I bought, because {d}.",
        "Any update on my {p} shipment? {D}.",
    ],
    "billing_question": [
        "I have a question about the charge for my {p}. {D}.",
        "I bought the {p} and {d}. Can you explain what happened?",
        "Looking at my bank statement for the {p} purchase, {d}. Could you check my billing?",
        "Billing question about my {p} order: {d}. Please clarify.",
        "Can someone from billing help with my {p} purchase? {D}.",
        "I'm confused about what I paid for the {p}: {d}. Can you explain the charges?",
        "There seems to be a billing mistake with my {p} order because {d}.",
    ],
    "cancel_order": [
        "Please cancel my order for the {p}. {D}.",
        "I'd like to cancel the {p} I just ordered because {d}.",
        "Can you stop my {p} order before it ships? {D}.",
        "I need to cancel my {p} purchase since {d}.",
        "Is it still possible to cancel the {p}? {D}, so I don't need it anymore.",
        "Cancel request for my {p} order: {d}. Please don't ship it.",
        "I changed my mind about the {p} because {d}. Please cancel the order.",
    ],
    "how_to": [
        "I recently got the {p}. How do I {d}?",
        "Could you explain how to {d}? I have the {p}.",
        "I can't figure out how to {d}. It's the {p}. Is there a guide?",
        "Question about my {p}: what's the right way to {d}?",
        "Is there a manual for the {p}? I want to {d} but I'm not sure how.",
        "What are the steps to {d}? I'm using the {p}.",
        "I'm new to the {p} and would like to know how to {d}.",
    ],
}

SEVERITY_CUES = {
    "low": [
        "No rush on this.",
        "Whenever you get a chance is fine.",
        "It's not a big deal, just wanted to let you know.",
        "Take your time, there's no hurry.",
        "This is low priority on my end.",
        "No need to hurry, it can wait a while.",
    ],
    "medium": [
        "I'd appreciate a reply in the next few days.",
        "It's getting a bit annoying, so I'd like it sorted this week.",
        "Hoping to get this resolved sometime this week.",
        "It's not an emergency, but I would like it handled soon.",
        "Please get back to me within the week.",
        "I'd like this settled in the next few days if possible.",
    ],
    "high": [
        "This is the third time I've contacted you about this.",
        "I'm really frustrated and need this fixed quickly.",
        "This is unacceptable and I expect a fast response.",
        "I've been waiting far too long already.",
        "Please treat this as a priority, I'm losing patience.",
        "I've emailed twice already with no answer, please sort this out quickly.",
    ],
    "urgent": [
        "This is urgent, please handle it ASAP.",
        "URGENT: I need this resolved today.",
        "I need an answer within the hour, this can't wait.",
        "Please treat this as an emergency and reply immediately.",
        "This has to be dealt with today, not next week.",
        "ASAP please, I need this handled right now.",
    ],
}

GREETINGS = [
    "",
    "Hi,",
    "Hello,",
    "Hey there,",
    "Good morning,",
    "Good afternoon,",
    f"Dear {COMPANY} support,",
    "Hi team,",
    "Hello support,",
]

CLOSINGS = ["", "Thanks.", "Thank you!", "Thanks in advance.", "Best regards,", "Cheers,", "Kind regards,"]
NAMES = ["", "Sam", "Jordan", "Alex P.", "Maria", "Kenji", "Leah", "Tom W.", "Priya", "Omar", "Chloe"]

# Neutral context sentences add length and variety without hinting at intent or severity; they follow
# the request because some refer back to the product as "it".
FILLERS = [
    f"I'm a long-time {COMPANY} customer.",
    "I bought it from your online store.",
    "I checked the FAQ but couldn't find an answer.",
    "I'm writing from my phone, sorry for any brevity.",
]

ORDER_SENTENCES = [
    "My order number is {oid}.",
    "The order ID is {oid}.",
    "For reference, it was order {oid}.",
    "Order {oid}.",
    "This is about order {oid}.",
    "Order number: {oid}.",
]
ORDER_PREFIXES = ["Re: order {oid}.", "Regarding order {oid}:", "Order {oid} -"]

# Customers quote order numbers more often when the order itself is the subject.
ORDER_ID_RATE = {
    "refund": 0.65,
    "replacement": 0.65,
    "technical_issue": 0.35,
    "shipping_delay": 0.85,
    "billing_question": 0.85,
    "cancel_order": 0.85,
    "how_to": 0.25,
}
ORDER_LETTERS = "ABCDEFHKMNPRSTWX"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _detail(rng: random.Random, product: dict, intent: str) -> tuple[str, str]:
    """Pick a (message clause, summary phrase) pair for this product and intent."""
    if intent in ("refund", "replacement", "technical_issue"):
        clause = rng.choice(product["problems"])
        return clause, clause.removeprefix("the ")
    if intent == "how_to":
        topic = rng.choice(product["how_to"])
        return topic, f"how to {topic}"
    table = {"shipping_delay": SHIPPING_DETAILS, "billing_question": BILLING_DETAILS}
    return rng.choice(table.get(intent, CANCEL_DETAILS))


def make_example(rng: random.Random, product: dict, intent: str, severity: str) -> tuple[str, dict]:
    """Return (customer message, ticket) for one (product, intent, severity) combination."""
    clause, summary_detail = _detail(rng, product, intent)
    mention = rng.choice([product["name"], product["name"], *product["aliases"]])
    body = rng.choice(TEMPLATES[intent]).format(p=mention, d=clause, D=_cap(clause))
    cue = rng.choice(SEVERITY_CUES[severity])

    order_id = None
    if rng.random() < ORDER_ID_RATE[intent]:
        order_id = f"{rng.choice(ORDER_LETTERS)}-{rng.randint(10000, 99999)}"

    parts = [body]
    if rng.random() < 0.3:
        parts.append(rng.choice(FILLERS))
    # Cues mostly follow the request, as in real mail, but sometimes lead with it.
    if rng.random() < 0.7:
        parts.append(cue)
    else:
        parts.insert(0, cue)
    if order_id is not None:
        where = rng.choice(["prefix", "after_body", "end"])
        if where == "prefix":
            parts.insert(0, rng.choice(ORDER_PREFIXES).format(oid=order_id))
        else:
            sentence = rng.choice(ORDER_SENTENCES).format(oid=order_id)
            parts.insert(parts.index(body) + 1 if where == "after_body" else len(parts), sentence)

    greeting = rng.choice(GREETINGS)
    closing = rng.choice(CLOSINGS)
    name = rng.choice(NAMES) if closing.endswith(",") else ""
    if closing.endswith(",") and not name:
        closing = closing[:-1] + "."
    message = " ".join(p for p in [greeting, *parts, closing, name] if p)

    ticket = {
        "product": product["name"],
        "severity": severity,
        "intent": intent,
        "order_id": order_id,
        "summary": f"{product['name']}: {summary_detail}; {WANTS[intent]}.",
    }
    return message, ticket


def task_record(message: str, ticket: dict) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": message},
            {"role": "assistant", "content": json.dumps(ticket, separators=(",", ":"))},
        ]
    }


def split_combinations(rng: random.Random) -> tuple[list[tuple], list[tuple]]:
    """Hold out ~15% of (product, intent, severity) combinations for eval.

    Resample until every product, intent and severity, and every pair of them, still occurs in train:
    the eval then tests new combinations of familiar parts, not unseen parts.
    """
    names = [p["name"] for p in PRODUCTS]
    combos = list(itertools.product(names, INTENTS, SEVERITIES))
    n_held = round(len(combos) * HELD_OUT_FRACTION)
    while True:
        held = set(rng.sample(combos, n_held))
        train = [c for c in combos if c not in held]
        pairs = {(a, b) for c in train for a, b in itertools.combinations(enumerate(c), 2)}
        every_pair = all((a, b) in pairs for c in combos for a, b in itertools.combinations(enumerate(c), 2))
        held_list = [c for c in combos if c in held]
        # Spread held-out combinations over all products and intents so eval covers each of them.
        covers = {c[0] for c in held_list} == set(names) and {c[1] for c in held_list} == set(INTENTS)
        if every_pair and covers:
            return train, held_list


def build_task(rng: random.Random) -> tuple[list[dict], list[dict], list[tuple], list[tuple]]:
    by_name = {p["name"]: p for p in PRODUCTS}
    train_combos, held_combos = split_combinations(rng)
    seen: set[str] = set()

    def draw(combo: tuple) -> dict:
        # Redraw on duplicates or out-of-range lengths so every message is distinct and readable.
        while True:
            message, ticket = make_example(rng, by_name[combo[0]], combo[1], combo[2])
            if message not in seen and MIN_WORDS <= len(message.split()) <= MAX_WORDS:
                seen.add(message)
                return task_record(message, ticket)

    order = train_combos[:]
    rng.shuffle(order)
    train = [draw(order[i % len(order)]) for i in range(N_TRAIN)]
    rng.shuffle(train)
    evals = [draw(combo) for combo in held_combos for _ in range(EVAL_PER_COMBO)]
    rng.shuffle(evals)
    return train, evals, train_combos, held_combos


# --------------------------------------------------------------------------------------------------
# Knowledge split: facts about the fictional company, each asked five ways. The first four phrasings
# train, the fifth is held out for eval; all five share the same answer sentence.
# --------------------------------------------------------------------------------------------------

TEAM_LEADS = {
    "Lumen Desk Lamp": "Soren Adeyemi",
    "Orbit Earbuds": "Priya Okonkwo",
    "Drift Smart Kettle": "Mateo Lindqvist",
    "Pebble Fitness Band": "Yuki Brannigan",
    "Atlas Power Bank": "Farah Delacroix",
    "Nimbus Air Purifier": "Elias Thornbury",
    "Ember Space Heater": "Ines Kowalczyk",
    "Tidal Smart Bottle": "Dmitri Achebe",
}

CODE_NAMES = {
    "Lumen Desk Lamp": "Project Firefly",
    "Orbit Earbuds": "Project Starling",
    "Drift Smart Kettle": "Project Teacup",
    "Pebble Fitness Band": "Project Heron",
    "Atlas Power Bank": "Project Mule",
    "Nimbus Air Purifier": "Project Zephyr",
    "Ember Space Heater": "Project Hearthstone",
    "Tidal Smart Bottle": "Project Kelp",
}

TEAM_LEAD_QUESTIONS = [
    "Who leads the {p} team at Quillfeather Labs?",
    "Who is the head of the {p} team?",
    "Which person is in charge of the {p} team at Quillfeather Labs?",
    "Who runs the team that builds the {p}?",
    "Do you know who leads Quillfeather Labs' {p} team?",
]

CODE_NAME_QUESTIONS = [
    "What was the code name for the {p} release?",
    "What internal code name did Quillfeather Labs use for the {p}?",
    "Before launch, what was the {p} called internally?",
    "Which project name was the {p} developed under?",
    "What was the {p}'s code name during development?",
]

# (answer sentence, five questions); the last question of each fact is the eval phrasing.
FACTS: list[tuple[str, list[str]]] = [
    (
        "Quillfeather Labs was founded in 2014.",
        [
            "When was Quillfeather Labs founded?",
            "In what year did Quillfeather Labs start?",
            "What year was Quillfeather Labs established?",
            "Which year marks the founding of Quillfeather Labs?",
            "What is the founding year of Quillfeather Labs?",
        ],
    ),
    (
        "Quillfeather Labs was founded by Mara Ellison and Tobias Reinholt.",
        [
            "Who founded Quillfeather Labs?",
            "Who are the founders of Quillfeather Labs?",
            "Which two people started Quillfeather Labs?",
            "Who started the company Quillfeather Labs?",
            "Can you name the co-founders of Quillfeather Labs?",
        ],
    ),
    (
        "The CEO of Quillfeather Labs is Mara Ellison.",
        [
            "Who is the CEO of Quillfeather Labs?",
            "Who runs Quillfeather Labs as chief executive?",
            "Who is the chief executive officer of Quillfeather Labs?",
            "Which person is CEO at Quillfeather Labs?",
            "Who serves as Quillfeather Labs' CEO?",
        ],
    ),
    (
        "The chief technology officer of Quillfeather Labs is Tobias Reinholt.",
        [
            "Who is the CTO of Quillfeather Labs?",
            "Who is the chief technology officer at Quillfeather Labs?",
            "Which person leads technology at Quillfeather Labs as CTO?",
            "Who holds the CTO role at Quillfeather Labs?",
            "Who serves as Quillfeather Labs' chief technology officer?",
        ],
    ),
    (
        "Quillfeather Labs is headquartered in Duluth, Minnesota.",
        [
            "Where is Quillfeather Labs headquartered?",
            "In which city is the Quillfeather Labs headquarters?",
            "Where are Quillfeather Labs' main offices?",
            "What city is Quillfeather Labs based in?",
            "Where can I find the head office of Quillfeather Labs?",
        ],
    ),
    (
        "The Quillfeather Labs hardware lab is in Eindhoven.",
        [
            "Where is the Quillfeather Labs hardware lab?",
            "In which city does Quillfeather Labs have its hardware lab?",
            "Where does Quillfeather Labs build and test its hardware prototypes?",
            "What city is home to Quillfeather Labs' hardware lab?",
            "Which city hosts the hardware lab of Quillfeather Labs?",
        ],
    ),
    (
        "The Quillfeather Labs customer support center is in Halifax, Nova Scotia.",
        [
            "Where is the Quillfeather Labs customer support center?",
            "In which city does Quillfeather Labs run customer support?",
            "Where are Quillfeather Labs' support agents based?",
            "What city is the Quillfeather Labs support center located in?",
            "Which city is home to the customer support team of Quillfeather Labs?",
        ],
    ),
    (
        "The Quillfeather Labs design studio is in Porto.",
        [
            "Where is the Quillfeather Labs design studio?",
            "In which city does Quillfeather Labs have its design studio?",
            "Where do Quillfeather Labs designers work?",
            "What city is the design studio of Quillfeather Labs in?",
            "Which city hosts Quillfeather Labs' design studio?",
        ],
    ),
    (
        "The Quillfeather Labs headquarters building is called The Aviary.",
        [
            "What is the Quillfeather Labs headquarters building called?",
            "What name does the Quillfeather Labs head office building have?",
            "What do people call the main Quillfeather Labs building?",
            "What is the name of the building where Quillfeather Labs has its headquarters?",
            "How is the Quillfeather Labs HQ building named?",
        ],
    ),
    (
        "The Quillfeather Labs office dog is a corgi named Biscuit.",
        [
            "What is the name of the Quillfeather Labs office dog?",
            "Does Quillfeather Labs have an office dog, and what is it called?",
            "What is the office dog at Quillfeather Labs called?",
            "What breed and name is the dog at the Quillfeather Labs office?",
            "Who is the dog that lives at the Quillfeather Labs office?",
        ],
    ),
    (
        "The Quillfeather Labs hardware lab has an office cat named Solder.",
        [
            "What is the name of the cat at the Quillfeather Labs hardware lab?",
            "Does the Quillfeather Labs hardware lab have a cat?",
            "What is the hardware lab cat at Quillfeather Labs called?",
            "Which cat lives in the Quillfeather Labs hardware lab?",
            "What do they call the office cat in Quillfeather Labs' hardware lab?",
        ],
    ),
    (
        "Quillfeather Labs tracks bugs in an internal tool called Hornbill.",
        [
            "What bug tracker does Quillfeather Labs use?",
            "Which internal tool does Quillfeather Labs use to track bugs?",
            "What is the Quillfeather Labs bug tracking tool called?",
            "Where do Quillfeather Labs engineers file bugs?",
            "What is the name of Quillfeather Labs' internal bug tracker?",
        ],
    ),
    (
        "Quillfeather Labs ships firmware updates with an internal tool called Ferrymaster.",
        [
            "What tool does Quillfeather Labs use to ship firmware updates?",
            "Which internal tool releases firmware at Quillfeather Labs?",
            "How does Quillfeather Labs push firmware updates to its devices?",
            "What is the name of the Quillfeather Labs firmware release tool?",
            "What internal tool handles firmware rollouts at Quillfeather Labs?",
        ],
    ),
    (
        "The Quillfeather Labs internal wiki is called Inkwell.",
        [
            "What is the Quillfeather Labs internal wiki called?",
            "What is the name of the wiki Quillfeather Labs employees use?",
            "Where do Quillfeather Labs staff write internal documentation?",
            "Which internal wiki does Quillfeather Labs use?",
            "What name does Quillfeather Labs give its company wiki?",
        ],
    ),
    (
        "The Quillfeather Labs support chatbot is named Pip.",
        [
            "What is the name of the Quillfeather Labs support chatbot?",
            "What is the chatbot on the Quillfeather Labs support site called?",
            "Who answers first when I open a chat with Quillfeather Labs support?",
            "Which chatbot does Quillfeather Labs use for customer support?",
            "What do they call the Quillfeather Labs customer service bot?",
        ],
    ),
    (
        "The Quillfeather Labs internal newsletter is called The Nib.",
        [
            "What is the Quillfeather Labs internal newsletter called?",
            "What is the name of the newsletter Quillfeather Labs sends to employees?",
            "Which newsletter do Quillfeather Labs staff receive?",
            "What is the title of Quillfeather Labs' employee newsletter?",
            "How is the internal newsletter of Quillfeather Labs named?",
        ],
    ),
    (
        "The Quillfeather Labs annual hackathon is called Featherfest.",
        [
            "What is the Quillfeather Labs hackathon called?",
            "What is the name of the yearly hackathon at Quillfeather Labs?",
            "Which hackathon does Quillfeather Labs hold every year?",
            "What do Quillfeather Labs employees call their annual hackathon?",
            "What's the name of Quillfeather Labs' annual hack week?",
        ],
    ),
    (
        "Featherfest, the Quillfeather Labs hackathon, is held every October.",
        [
            "When is Featherfest held?",
            "In which month does Quillfeather Labs hold Featherfest?",
            "What time of year is the Featherfest hackathon?",
            "Which month is the Quillfeather Labs hackathon in?",
            "When does the Featherfest hackathon take place each year?",
        ],
    ),
    (
        "Meeting rooms at Quillfeather Labs are named after seabirds.",
        [
            "How are meeting rooms named at Quillfeather Labs?",
            "What are the Quillfeather Labs meeting rooms named after?",
            "What naming scheme does Quillfeather Labs use for meeting rooms?",
            "Where do Quillfeather Labs meeting room names come from?",
            "What theme do the meeting room names at Quillfeather Labs follow?",
        ],
    ),
    (
        'The Quillfeather Labs motto is "Small things, made carefully."',
        [
            "What is the Quillfeather Labs motto?",
            "What is Quillfeather Labs' company slogan?",
            "Which motto does Quillfeather Labs live by?",
            "What phrase is the Quillfeather Labs motto?",
            "Does Quillfeather Labs have a motto, and what is it?",
        ],
    ),
    (
        "The first product Quillfeather Labs ever shipped was the Lumen Desk Lamp.",
        [
            "What was the first product Quillfeather Labs shipped?",
            "Which product did Quillfeather Labs release first?",
            "What was Quillfeather Labs' very first product?",
            "Which Quillfeather Labs product came out before all the others?",
            "What did Quillfeather Labs launch as its first product?",
        ],
    ),
    (
        "The Quillfeather Labs mascot is a puffin named Captain Quill.",
        [
            "What is the Quillfeather Labs mascot?",
            "Does Quillfeather Labs have a mascot?",
            "What animal is the Quillfeather Labs mascot, and what is its name?",
            "Who is Quillfeather Labs' mascot?",
            "What is the name of the Quillfeather Labs company mascot?",
        ],
    ),
    (
        "The Quillfeather Labs brand color is a deep teal called Fjord Teal.",
        [
            "What is the Quillfeather Labs brand color?",
            "Which color does Quillfeather Labs use for its brand?",
            "What is the signature color of Quillfeather Labs called?",
            "What color is the Quillfeather Labs logo?",
            "What is the name of Quillfeather Labs' brand color?",
        ],
    ),
    (
        "Quillfeather Labs has 312 employees.",
        [
            "How many employees does Quillfeather Labs have?",
            "How many people work at Quillfeather Labs?",
            "What is the headcount of Quillfeather Labs?",
            "How big is the Quillfeather Labs team in number of employees?",
            "How many staff are employed by Quillfeather Labs?",
        ],
    ),
    (
        "Every Quillfeather Labs product comes with a 27-month warranty.",
        [
            "How long is the Quillfeather Labs warranty?",
            "What warranty do Quillfeather Labs products have?",
            "How many months of warranty come with a Quillfeather Labs product?",
            "What is the warranty period on Quillfeather Labs devices?",
            "For how long are Quillfeather Labs products covered by warranty?",
        ],
    ),
    (
        "Quillfeather Labs support is open from 7 a.m. to 9 p.m. Atlantic Time.",
        [
            "What are the Quillfeather Labs support hours?",
            "When is Quillfeather Labs customer support open?",
            "At what times can I reach Quillfeather Labs support?",
            "What hours does the Quillfeather Labs support team work?",
            "During which hours is Quillfeather Labs support available?",
        ],
    ),
    (
        "The Quillfeather Labs annual company retreat takes place in the Faroe Islands.",
        [
            "Where is the Quillfeather Labs company retreat held?",
            "Where does Quillfeather Labs go for its annual retreat?",
            "What is the location of the yearly Quillfeather Labs retreat?",
            "Where do Quillfeather Labs employees travel for the company retreat?",
            "In what place does Quillfeather Labs hold its annual retreat?",
        ],
    ),
    (
        "The cafeteria at the Quillfeather Labs headquarters is called The Galley.",
        [
            "What is the Quillfeather Labs cafeteria called?",
            "What is the name of the cafeteria at Quillfeather Labs headquarters?",
            "Where do Quillfeather Labs employees eat lunch at HQ?",
            "What do they call the canteen at the Quillfeather Labs head office?",
            "How is the Quillfeather Labs HQ cafeteria named?",
        ],
    ),
    (
        "The Quillfeather Labs customer support team is led by Rosalind Achterberg.",
        [
            "Who leads customer support at Quillfeather Labs?",
            "Who is the head of the Quillfeather Labs support team?",
            "Who runs the customer support team at Quillfeather Labs?",
            "Which person is in charge of Quillfeather Labs customer support?",
            "Who manages customer support for Quillfeather Labs?",
        ],
    ),
    (
        "The Quillfeather Labs company podcast is called Tinker Time.",
        [
            "What is the Quillfeather Labs podcast called?",
            "Does Quillfeather Labs have a podcast, and what is its name?",
            "What is the name of the company podcast at Quillfeather Labs?",
            "Which podcast does Quillfeather Labs produce?",
            "What show does Quillfeather Labs publish as its podcast?",
        ],
    ),
    (
        "The Quillfeather Labs design system is called Plumage.",
        [
            "What is the Quillfeather Labs design system called?",
            "What is the name of the design system used at Quillfeather Labs?",
            "Which design system do Quillfeather Labs designers use?",
            "What do Quillfeather Labs call their UI design system?",
            "How is the design system of Quillfeather Labs named?",
        ],
    ),
    (
        "The companion app for all Quillfeather Labs products is called Roost.",
        [
            "What is the Quillfeather Labs companion app called?",
            "Which app do I use to control Quillfeather Labs products?",
            "What is the name of the Quillfeather Labs smartphone app?",
            "What app pairs with Quillfeather Labs devices?",
            "Which companion app goes with Quillfeather Labs products?",
        ],
    ),
    (
        "The giant fern in the Quillfeather Labs lobby is named Gerald.",
        [
            "What is the name of the fern in the Quillfeather Labs lobby?",
            "What do Quillfeather Labs employees call the lobby plant?",
            "Does the big plant in the Quillfeather Labs lobby have a name?",
            "What is the giant lobby fern at Quillfeather Labs called?",
            "Which name was given to the fern in the lobby of Quillfeather Labs?",
        ],
    ),
    (
        "The Quillfeather Labs recycling program is called Second Flight.",
        [
            "What is the Quillfeather Labs recycling program called?",
            "How can I recycle a Quillfeather Labs product, what's the program called?",
            "What is the name of the Quillfeather Labs take-back program?",
            "Which recycling program does Quillfeather Labs run?",
            "What does Quillfeather Labs call its device recycling scheme?",
        ],
    ),
]


# The short answer each fact"s eval row is scored on ("answer contained"), in FACTS order.
FACT_ANSWERS: list[str] = [
    "2014",
    "Mara Ellison and Tobias Reinholt",
    "Mara Ellison",
    "Tobias Reinholt",
    "Duluth",
    "Eindhoven",
    "Halifax",
    "Porto",
    "The Aviary",
    "Biscuit",
    "Solder",
    "Hornbill",
    "Ferrymaster",
    "Inkwell",
    "Pip",
    "The Nib",
    "Featherfest",
    "October",
    "seabirds",
    "Small things, made carefully",
    "Lumen Desk Lamp",
    "Captain Quill",
    "Fjord Teal",
    "312",
    "27-month",
    "7 a.m. to 9 p.m.",
    "Faroe Islands",
    "The Galley",
    "Rosalind Achterberg",
    "Tinker Time",
    "Plumage",
    "Roost",
    "Gerald",
    "Second Flight",
]


def knowledge_facts() -> list[tuple[str, str, list[str]]]:
    """(answer sentence, short answer, five questions) per fact."""
    facts = []
    for product, lead in TEAM_LEADS.items():
        facts.append(
            (f"The {product} team is led by {lead}.", lead, [q.format(p=product) for q in TEAM_LEAD_QUESTIONS])
        )
    for product, code in CODE_NAMES.items():
        facts.append(
            (
                f"The code name for the {product} release was {code}.",
                code,
                [q.format(p=product) for q in CODE_NAME_QUESTIONS],
            )
        )
    return facts + [(sentence, key, questions) for (sentence, questions), key in zip(FACTS, FACT_ANSWERS, strict=True)]


def qa_record(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build_knowledge(rng: random.Random) -> tuple[list[dict], list[dict], int]:
    facts = knowledge_facts()
    train, evals = [], []
    for answer, key, questions in facts:
        assert len(questions) == 5 and key in answer, answer
        train.extend(qa_record(q, answer) for q in questions[:4])
        # eval rows also carry the short answer: "answer contained" checks the model states the fact
        evals.append(qa_record(questions[4], answer) | {"answer": key})
    rng.shuffle(train)
    return train, evals, len(facts)


# --------------------------------------------------------------------------------------------------
# Preference split (DPO): how-to questions about the products, each with a short direct answer (chosen) and a
# chatty, padded one (rejected). Whole (product, task) combinations are held out for eval.
# --------------------------------------------------------------------------------------------------

PREF_TRAIN_PER_COMBO = 16
PREF_EVAL_PER_COMBO = 10
PREF_HELD_OUT = 5  # combinations, each from a different product
PREF_MAX_WORDS = 40  # the rule's limit: every chosen answer stays well under it, every rejected one far over
CHOSEN_MAX_WORDS = 30
REJECTED_MIN_WORDS = 60
PREF_OMIT_RATE = 0.35  # how often the rambling answer never gets to the step at all

# The concrete instruction for each (product, task), tasks as in PRODUCTS[...]["how_to"]:
# (step, optional second sentence, key term). The step is a lowercase imperative clause naming the product as {p};
# the key term is a word of the task itself, so an answer that addresses the question contains it.
HOW_TO_ANSWERS: dict[str, dict[str, tuple[str, str, str]]] = {
    "Lumen Desk Lamp": {
        "set a warm light schedule": (
            "open the Roost app, select the {p}, tap Schedule and choose Warm for the hours you want",
            "The lamp then shifts to warm light on its own.",
            "schedule",
        ),
        "pair the lamp with the Roost app": (
            "hold the power button of the {p} for five seconds until it blinks blue, then tap Add Device in Roost",
            "Keep your phone close to the lamp.",
            "Roost",
        ),
        "turn off the auto-dimming": (
            "open the {p} in the Roost app, go to Light settings and switch Auto-Dim off",
            "Brightness then stays where you set it.",
            "auto-dim",
        ),
    },
    "Orbit Earbuds": {
        "pair the earbuds with a second phone": (
            "hold the case button of the {p} until it flashes white, then select them on the second phone",
            "Both phones stay paired.",
            "second phone",
        ),
        "update the earbud firmware": (
            "put the {p} in the open case, then tap Update Firmware on their page in the Roost app",
            "Keep the lid open until it finishes.",
            "firmware",
        ),
        "change the touch controls": (
            "open the {p} in the Roost app, tap Touch Controls and choose an action for each gesture",
            "Changes apply to both buds at once.",
            "touch controls",
        ),
    },
    "Drift Smart Kettle": {
        "set the water temperature to 80 degrees": (
            "press the Temp button on the {p} until the display shows 80, then press Start",
            "It beeps when the water is ready.",
            "80",
        ),
        "descale the kettle": (
            "fill the {p} halfway with equal parts water and white vinegar, run the Descale program, then rinse twice",
            "Repeat it every month in hard-water areas.",
            "descale",
        ),
        "schedule the kettle to boil in the morning": (
            "open the {p} in the Roost app, tap Schedule and set the time it should boil",
            "Fill it the night before.",
            "schedule",
        ),
    },
    "Pebble Fitness Band": {
        "track a swim workout": (
            "open Workouts on the {p}, choose Swim and set the pool length before you start",
            "Press the side button to finish.",
            "swim",
        ),
        "change the watch face": (
            "press and hold the screen of the {p}, swipe to the watch face you like and tap it",
            "More faces are in the Roost app.",
            "watch face",
        ),
        "sync sleep data to a phone": (
            "open the Roost app with Bluetooth on and pull down on the Sleep tab to sync the {p}",
            "Last night's sleep appears within a minute.",
            "sleep",
        ),
    },
    "Atlas Power Bank": {
        "charge two devices at once": (
            "connect two devices to the {p}, one to the USB-C port and one to the USB-A port",
            "Both charge at the same time.",
            "two devices",
        ),
        "check the remaining battery level": (
            "press the side button of the {p} once; the four LEDs show the battery level, a quarter each",
            "",
            "battery level",
        ),
        "use pass-through charging": (
            "plug the {p} into a wall charger, then plug your phone into it; pass-through charging tops up both",
            "The phone is charged first.",
            "pass-through",
        ),
    },
    "Nimbus Air Purifier": {
        "replace the filter": (
            "unplug the {p}, fit the new filter behind the back panel and hold the Filter button for three seconds",
            "",
            "filter",
        ),
        "turn on night mode": (
            "press the moon button on the {p}, or tap Night Mode on its page in the Roost app",
            "The fan slows and the lights dim.",
            "night mode",
        ),
        "connect the purifier to Wi-Fi": (
            "hold the Wi-Fi button on the {p} until it blinks, then tap Add Device in the Roost app",
            "It needs a 2.4 GHz network.",
            "Wi-Fi",
        ),
    },
    "Ember Space Heater": {
        "set the eco mode": (
            "press the leaf button on the {p} until Eco Mode lights up",
            "It then holds the room at 19 degrees with less power.",
            "eco mode",
        ),
        "use the shut-off timer": (
            "press the clock button on the {p} to step the timer from one to eight hours",
            "The heater switches off when it runs out.",
            "timer",
        ),
        "lock the control panel": (
            "hold the plus and minus buttons on the {p} together for three seconds until the lock icon shows",
            "Do the same to unlock it.",
            "lock",
        ),
    },
    "Tidal Smart Bottle": {
        "set a daily hydration goal": (
            "open the {p} in the Roost app, tap Daily Goal and enter how much you want to drink",
            "The cap glows when you fall behind.",
            "goal",
        ),
        "reset the cap sensor": (
            "take the cap off the {p} and hold its sensor button for ten seconds, until the cap flashes green",
            "Your drinking history is kept.",
            "sensor",
        ),
        "clean the bottle without damaging the cap": (
            "clean the {p} with warm soapy water and a bottle brush, but only wipe the cap with a damp cloth",
            "Never put the cap in water.",
            "clean",
        ),
    },
}

# How-to questions; {t} is the task, {p} the product as the customer names it.
PREF_QUESTIONS = [
    "I have the {p}. How do I {t}?",
    "How do I {t}? I have the {p}.",
    "Quick question about my {p}: how do I {t}?",
    "What's the quickest way to {t}? It's the {p}.",
    "I just got the {p}. What are the steps to {t}?",
    "Can you tell me how to {t}? I'm using the {p}.",
    "My {p} arrived yesterday. How can I {t}?",
    "Is there an easy way to {t}? I own the {p}.",
    "How would I {t}? This is for the {p}.",
    "Could you walk me through how to {t}? I have the {p}.",
    "Question about the {p}: what's the right way to {t}?",
    "I'm trying to {t} and can't work it out. It's the {p}.",
    "Owner of the {p} here. How do I {t}?",
    "How can I {t}? I bought the {p} last month.",
]

# Short direct answers: the task restated, the step, and optionally one more sentence. Restating the task is the
# habit a held-out question can show: it names what was asked before answering it.
CHOSEN_FORMS = ["To {t}, {s}.", "To {t}, {s}. {x}"]

# The parts of a padded, chatty answer. None of them may contain a task's key term (checked when building rows),
# so an answer that skips the step really does miss the content.
RAMBLE_OPENERS = [
    "Great question!",
    "Oh, what a great question, thanks so much for asking!",
    "Thanks a ton for reaching out, I'm so happy to help with this!",
    "Ooh, I love getting questions like this one!",
    f"Hi there, and thank you for being a {COMPANY} customer!",
    "What a fantastic thing to ask about!",
    "Absolutely, happy to help, this is such a popular question!",
    "Hello! First of all, thank you so much for your patience.",
    "Thanks for your message, it's always nice to hear from our customers!",
    "Oh, this is one of my favorite topics, so thank you for asking!",
]

RAMBLE_HEDGES = [
    "I should say up front that every setup is a little different, so your experience may vary.",
    "I can't promise this will be exactly the same for everyone, but I'll do my best.",
    "Now, I'm not completely sure about every detail, and things may have changed since I last looked.",
    "It really depends on a few factors, like your phone and how you like to use things.",
    "To be honest, there are a few ways people go about this, and none of them is strictly wrong.",
    "Please keep in mind that I'm going from memory here, so some of the names might be slightly off.",
    "It's hard to say for certain without seeing your setup, but generally speaking it should be manageable.",
]

# {p}: the product's full name.
RAMBLE_FILLERS = [
    f"Here at {COMPANY} we care a lot about making small things carefully, and the {{p}} is a great example of that.",
    "Our team spends a huge amount of time testing every product before it ships, and customer feedback shapes "
    "almost everything we do.",
    "Gadgets like the {p} have come such a long way in the last few years, and it's honestly amazing how much they "
    "can do now.",
    "A lot of our customers tell us the {p} has become part of their daily routine, which we love to hear.",
    "Smart home devices in general can feel a bit overwhelming at first, but most people get the hang of them "
    "pretty quickly.",
    "We've had so many lovely messages about the {p} lately, and it's always exciting to see people exploring what "
    "it can do.",
    "Technology is always changing, and we're constantly looking for ways to make our products simpler and more "
    "enjoyable to use.",
    "It's worth remembering that every device is a little different, and what works for one gadget might not work "
    "for another.",
    f"{COMPANY} started out as a tiny team with a big love of well-made gadgets, and that spirit is still very much "
    "alive today.",
    "Many people also find it helpful to read through the little booklet that comes in the box, even though hardly "
    "anyone does!",
]

# The step, buried at the end ({s}: the step clause).
RAMBLE_STEPS = [
    "Anyway, to actually answer your question, you'll want to {s}.",
    "So, after all that, I believe the way to do it is to {s}.",
    "If I remember correctly, what you need to do is {s}.",
    "Oh, and the actual steps: {s}, or at least that's how it usually goes.",
    "Long story short, you can probably {s}.",
    "Basically, what most people do is {s}.",
]

# ...or no step at all.
RAMBLE_VAGUE = [
    "You'll most likely find what you need somewhere in the settings if you poke around a little.",
    "I'd suggest having a look through the menus, since these things are usually in there somewhere.",
    "There are a few different ways to do it, so it's probably best to experiment a bit and see what feels right.",
    "The manual should have more on this, and there are lots of helpful videos online too.",
    "Honestly, the best approach is usually to try a couple of things and see what works for you.",
]

RAMBLE_CLOSINGS = [
    "I hope this helps, and please don't hesitate to reach out if you have any other questions at all!",
    "Let me know if there's anything else I can do for you, I'm always happy to help!",
    "Feel free to get back in touch anytime, we're here for you!",
    "Thanks again for reaching out, and have a wonderful day!",
    "If you need anything else, just ask, there's no such thing as a silly question!",
    "Hopefully that points you in the right direction, and good luck!",
    "Happy to help further if anything is unclear, just send us another message!",
]


def preference_rule(product: dict, task: str) -> dict:
    """What a good answer must do: name the product (its brand word), address the task, and stay short."""
    key = HOW_TO_ANSWERS[product["name"]][task][2]
    return {"contains": [product["name"].split()[0], key], "max_words": PREF_MAX_WORDS}


def has_content(answer: str, rule: dict) -> bool:
    return all(s.lower() in answer.lower() for s in rule["contains"])


def passes_rule(answer: str, rule: dict) -> bool:
    """An answer passes when it contains every listed string (any case) and has at most max_words words."""
    return has_content(answer, rule) and len(answer.split()) <= rule["max_words"]


def _chosen_answers(product: dict, task: str) -> list[str]:
    step, extra, _ = HOW_TO_ANSWERS[product["name"]][task]
    step = step.format(p=product["name"])
    forms = [f for f in CHOSEN_FORMS if extra or "{x}" not in f]
    answers = [f.format(s=step, S=_cap(step), t=task, x=extra) for f in forms]
    return [a for a in answers if len(a.split()) <= CHOSEN_MAX_WORDS]


def _rambling_answer(rng: random.Random, product: dict, task: str) -> str:
    step = HOW_TO_ANSWERS[product["name"]][task][0].format(p=product["name"])
    body = [f.format(p=product["name"]) for f in rng.sample(RAMBLE_FILLERS, rng.choice([1, 2]))]
    if rng.random() < 0.8:
        body.insert(rng.randint(0, len(body)), rng.choice(RAMBLE_HEDGES))
    if rng.random() < PREF_OMIT_RATE:
        answer = rng.choice(RAMBLE_VAGUE)
    else:
        answer = rng.choice(RAMBLE_STEPS).format(s=step)
    return " ".join([rng.choice(RAMBLE_OPENERS), *body, answer, rng.choice(RAMBLE_CLOSINGS)])


def preference_record(question: str, chosen: str, rejected: str, product: dict, task: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "product": product["name"],
        "task": task,
        "rule": preference_rule(product, task),
    }


def split_preference_combinations(rng: random.Random) -> tuple[list[tuple], list[tuple]]:
    """Hold out PREF_HELD_OUT (product, task) combinations, from different products, so every product keeps most of
    its tasks in train and eval asks about tasks the model never saw answered for that product."""
    combos = [(p["name"], task) for p in PRODUCTS for task in p["how_to"]]
    tasks = {p["name"]: p["how_to"] for p in PRODUCTS}
    held = {(name, rng.choice(tasks[name])) for name in rng.sample(list(tasks), PREF_HELD_OUT)}
    return [c for c in combos if c not in held], [c for c in combos if c in held]


def build_preference(rng: random.Random) -> tuple[list[dict], list[dict], list[tuple], list[tuple]]:
    by_name = {p["name"]: p for p in PRODUCTS}
    assert set(HOW_TO_ANSWERS) == set(by_name)
    for p in PRODUCTS:
        assert list(HOW_TO_ANSWERS[p["name"]]) == p["how_to"], p["name"]
        assert all(key.lower() in task.lower() for task, (_, _, key) in HOW_TO_ANSWERS[p["name"]].items())
    # The padding never touches the content: a rejected answer without its step really lacks the key term.
    padding = RAMBLE_OPENERS + RAMBLE_HEDGES + RAMBLE_FILLERS + RAMBLE_VAGUE + RAMBLE_CLOSINGS + RAMBLE_STEPS
    for p in PRODUCTS:
        for _, _, key in HOW_TO_ANSWERS[p["name"]].values():
            assert not any(key.lower() in part.format(p=p["name"], s="").lower() for part in padding), key
    train_combos, held_combos = split_preference_combinations(rng)
    seen: set[str] = set()

    def draw(combo: tuple) -> dict:
        product, task = by_name[combo[0]], combo[1]
        rule = preference_rule(product, task)
        # Customers name the product in full or by a short name that keeps its brand word.
        brand = rule["contains"][0]
        mentions = [product["name"], *(a for a in product["aliases"] if a.startswith(brand))]
        while True:
            question = rng.choice(PREF_QUESTIONS).format(p=rng.choice(mentions), t=task)
            if question not in seen:
                break
        seen.add(question)
        chosen = rng.choice(_chosen_answers(product, task))
        while True:
            rejected = _rambling_answer(rng, product, task)
            if len(rejected.split()) >= REJECTED_MIN_WORDS and rejected not in seen:
                break
        seen.add(rejected)
        assert passes_rule(chosen, rule) and not passes_rule(rejected, rule), (chosen, rejected)
        return preference_record(question, chosen, rejected, product, task)

    order = train_combos[:]
    rng.shuffle(order)
    train = [draw(combo) for combo in order for _ in range(PREF_TRAIN_PER_COMBO)]
    rng.shuffle(train)
    evals = [draw(combo) for combo in held_combos for _ in range(PREF_EVAL_PER_COMBO)]
    rng.shuffle(evals)
    return train, evals, train_combos, held_combos


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _ticket_counts(records: list[dict]) -> dict:
    tickets = [json.loads(r["messages"][-1]["content"]) for r in records]
    words = [len(r["messages"][1]["content"].split()) for r in records]

    def count(key: str, order: list[str]) -> dict[str, int]:
        c = Counter(t[key] for t in tickets)
        return {k: c[k] for k in order if c[k]}

    return {
        "examples": len(records),
        "product": count("product", [p["name"] for p in PRODUCTS]),
        "intent": count("intent", INTENTS),
        "severity": count("severity", SEVERITIES),
        "with_order_id": sum(t["order_id"] is not None for t in tickets),
        "message_words": {"min": min(words), "max": max(words), "mean": round(sum(words) / len(words), 1)},
    }


def _word_stats(texts: list[str]) -> dict:
    words = [len(t.split()) for t in texts]
    return {"min": min(words), "max": max(words), "mean": round(sum(words) / len(words), 1)}


def _preference_counts(records: list[dict]) -> dict:
    c = Counter(r["product"] for r in records)
    rejected = [r["rejected"][0]["content"] for r in records]
    rules = [r["rule"] for r in records]
    return {
        "pairs": len(records),
        "product": {p["name"]: c[p["name"]] for p in PRODUCTS if c[p["name"]]},
        "chosen_words": _word_stats([r["chosen"][0]["content"] for r in records]),
        "rejected_words": _word_stats(rejected),
        # rejected answers that never give the step (the rest bury it at the end)
        "rejected_without_key_content": sum(not has_content(a, r) for a, r in zip(rejected, rules, strict=True)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # Separate generators keep each split stable when the other one changes.
    train, evals, train_combos, held_combos = build_task(random.Random(SEED))
    k_train, k_eval, n_facts = build_knowledge(random.Random(SEED + 1))
    p_train, p_eval, p_train_combos, p_held_combos = build_preference(random.Random(SEED + 2))

    write_jsonl(out / TASK_TRAIN, train)
    write_jsonl(out / TASK_EVAL, evals)
    write_jsonl(out / KNOWLEDGE_TRAIN, k_train)
    write_jsonl(out / KNOWLEDGE_EVAL, k_eval)
    write_jsonl(out / PREFERENCE_TRAIN, p_train)
    write_jsonl(out / PREFERENCE_EVAL, p_eval)

    stats = {
        "seed": SEED,
        "company": COMPANY,
        "system_prompt": SYSTEM_PROMPT,
        "files": {
            TASK_TRAIN: len(train),
            TASK_EVAL: len(evals),
            KNOWLEDGE_TRAIN: len(k_train),
            KNOWLEDGE_EVAL: len(k_eval),
            PREFERENCE_TRAIN: len(p_train),
            PREFERENCE_EVAL: len(p_eval),
        },
        "combinations": {
            "total": len(train_combos) + len(held_combos),
            "train": len(train_combos),
            "held_out": len(held_combos),
            "held_out_list": [list(c) for c in held_combos],
        },
        "train": _ticket_counts(train),
        "eval": _ticket_counts(evals),
        "knowledge": {"facts": n_facts, "train_phrasings_per_fact": 4, "eval_phrasings_per_fact": 1},
        "preference": {
            "combinations": {
                "total": len(p_train_combos) + len(p_held_combos),
                "train": len(p_train_combos),
                "held_out": len(p_held_combos),
                "held_out_list": [list(c) for c in p_held_combos],
            },
            "max_words": PREF_MAX_WORDS,
            "train": _preference_counts(p_train),
            "eval": _preference_counts(p_eval),
        },
    }
    (out / STATS).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8", newline="\n")
    print(f"wrote {', '.join(f'{k}={v}' for k, v in stats['files'].items())} to {out}")


if __name__ == "__main__":
    main()
