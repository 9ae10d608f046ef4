"""The Ray Serve application of a `ServeSpec`, on either engine.

    transformers:  client ──HTTP──▶ Ingress (rayft.serving.ingress) ──▶ LLMServer × N (rayft.serving.model)
    vllm:          client ──HTTP──▶ Ray Serve LLM's OpenAI app ──▶ vLLM engine × N

Everything the app needs is in the spec (built by `rayft.serving.spec.build_spec`), so the same app starts
from `rayft serve` (rayft.serving.deploy), from `serve deploy` of an emitted config, or from a KubeRay
RayService: both of those name `rayft.serving.app:app_builder` with the spec as the application's args.
"""

from rayft.serving.ingress import Ingress
from rayft.serving.model import LLMServer
from rayft.serving.spec import ServeSpec


def build_app(spec: ServeSpec):
    """The Serve application for a spec (see rayft.serving.spec.build_spec)."""
    cfg = spec.serve
    if cfg.engine == "vllm":
        return build_vllm_app(spec)
    model = LLMServer.options(
        autoscaling_config=autoscaling_config(spec),
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
        health_check_period_s=5,
        health_check_timeout_s=30,
        # drain: a replica being removed (scale-down, redeploy, Ctrl-C) gets no new requests and finishes the
        # ones it holds for up to serve.drain_timeout_s
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s,
    ).bind(spec)
    return Ingress.options(
        num_replicas=1,
        max_ongoing_requests=max(100, cfg.max_queued_requests * 2),
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s,
    ).bind(spec, model)


def app_builder(args: dict):
    """Entry point for `serve deploy` / RayService configs: `import_path: rayft.serving.app:app_builder`, the
    spec as `args` (what `rayft serve --emit-config` writes). Args that are not a valid spec are refused."""
    return build_app(ServeSpec.from_args(args))


def autoscaling_config(spec: ServeSpec) -> dict:
    """Serve's autoscaling_config for the model replicas, from serve.autoscaling."""
    a = spec.serve.autoscaling
    return {
        "min_replicas": a.min_replicas,
        "initial_replicas": max(1, a.min_replicas),
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "look_back_period_s": a.look_back_period_s,
    }


VLLM_TOOL_PARSERS = {"hermes": "hermes", "llama3": "llama3_json", "mistral": "mistral"}


def vllm_tool_kwargs(tokenizer) -> dict:
    """vLLM's settings for reading tool calls, from the model's chat template: its parser for the syntax the template
    teaches (rayft.training.tools.tool_syntax). A template that renders no tools gets none: vLLM renders prompts with
    the model's own template, which cannot hold rayft's tool format, so tools are for the transformers engine there.
    `response_format` and forced calls need nothing: vLLM enforces them with its own structured output."""
    from rayft.training.tools import native_tools, tool_syntax

    if not native_tools(tokenizer):
        return {}
    return {"enable_auto_tool_choice": True, "tool_call_parser": VLLM_TOOL_PARSERS[tool_syntax(tokenizer).name]}


def build_vllm_app(spec: ServeSpec):
    """The same model behind Ray Serve LLM's vLLM engine and OpenAI app (GPU clusters only).

    It takes the model, its name and revision, serve.autoscaling, serve.max_ongoing_requests, serve.dtype,
    serve.drain_timeout_s and serve.gpus_per_replica (the tensor-parallel size); batching is vLLM's own. A spec
    that sets anything else (API keys, LoRA adapters, rayft's batching and limits) is refused when it is built
    (ServeSpec), since this app would ignore it; so is an API key in the environment where the app starts, and
    a network bind without serve.allow_unauthenticated."""
    from rayft.serving.spec import env_api_key

    cfg = spec.serve
    here = [f"${cfg.api_key_env}"] if env_api_key(cfg.api_key_env) else []
    here += ["serve.api_keys_file"] if cfg.api_keys_file else []
    here += ["serve.admin_keys_file"] if cfg.admin_keys_file else []
    if here:  # keys the vLLM app would not check: refuse rather than serve openly
        raise RuntimeError(
            f"serve.engine vllm cannot check API keys, but {' and '.join(here)} is set where the app starts: use "
            "serve.engine: transformers, or put the vLLM app behind a gateway that checks keys and set none here"
        )
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise RuntimeError(
            f"serve.engine is vllm but Ray Serve LLM cannot load ({e}); install vllm on the GPU nodes "
            "(pip install 'ray[llm]') or use serve.engine: transformers"
        ) from None
    from rayft.training.models import resolve_dtype

    if cfg.gpus_per_replica <= 0:
        raise RuntimeError("serve.engine vllm needs GPUs: set serve.gpus_per_replica (e.g. 1)")
    engine = {"dtype": resolve_dtype(cfg.dtype, "cuda"), "tensor_parallel_size": max(1, int(cfg.gpus_per_replica))}
    if spec.revision:
        engine |= {"revision": spec.revision, "tokenizer_revision": spec.revision}
    from transformers import AutoTokenizer

    from rayft.training import storage

    engine |= vllm_tool_kwargs(AutoTokenizer.from_pretrained(storage.cached(spec.model_path), revision=spec.revision))
    llm = LLMConfig(
        model_loading_config={"model_id": spec.model_name, "model_source": spec.model_path},
        deployment_config={
            "autoscaling_config": autoscaling_config(spec),
            "max_ongoing_requests": cfg.max_ongoing_requests,
            "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
        },
        engine_kwargs=engine,
    )
    return build_openai_app({"llm_configs": [llm]})
