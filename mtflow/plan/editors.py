"""What the plan needs to know about an editor: how to build it on the meta device at real size and how to run
its forward pass on fake tensors. One planner per ``EditPolicy`` class; a new editor adds its row with
``register_planner`` (a class with the methods of ``KontextPlanner``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from mtflow.models.base import TextEmbeddings
from mtflow.plan.architectures import FoundConfig, build_on_meta, find_config
from mtflow.plan.flops import FluxArch, T5Arch

PLANNERS: dict[str, type] = {}


def register_planner(policy_class_path: str, planner: type) -> None:
    """Make ``mtflow check`` plan policies of ``policy_class_path`` with ``planner``."""
    PLANNERS[policy_class_path] = planner


def planner_for(policy) -> KontextPlanner:
    cls = type(policy)
    key = f"{cls.__module__}.{cls.__qualname__}"
    if key not in PLANNERS:
        raise ValueError(
            f"model.policy: mtflow check has no memory plan for {key}; planned editors: {sorted(PLANNERS)} "
            "(an editor adds its own with mtflow.plan.editors.register_planner)"
        )
    return PLANNERS[key](policy)


class KontextPlanner:
    """FLUX.1-Kontext (``KontextPolicy``): transformer, VAE, CLIP-L and T5-XXL from their ``config.json``."""

    COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")

    def __init__(self, policy) -> None:
        self.policy = policy
        self.configs: dict[str, FoundConfig] = {
            kind: find_config(policy.pretrained, kind, policy.revision) for kind in self.COMPONENTS
        }
        t = self.configs["transformer"].values
        self.double_blocks, self.single_blocks = int(t["num_layers"]), int(t["num_single_layers"])
        self.channels = int(t["in_channels"])
        self.text_width = int(t["joint_attention_dim"])
        self.pooled_width = int(t["pooled_projection_dim"])
        vae = self.configs["vae"].values
        self.vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
        self.latent_channels = int(vae["latent_channels"])
        if policy.resolution % (2 * self.vae_scale):
            raise ValueError(
                f"model.policy.init_args.resolution: {policy.resolution} must be a multiple of {2 * self.vae_scale}"
            )
        self.tokens = (policy.resolution // (2 * self.vae_scale)) ** 2

    # ------------------------------------------------------------------ modules
    def component(self, kind: str) -> nn.Module:
        return build_on_meta(kind, self.configs[kind].values, self.policy.model_dtype)

    def meta_policy(self, adapters: Sequence[str], double: int | None = None, single: int | None = None):
        """A copy of the configured policy whose transformer (at ``double`` + ``single`` blocks, default: all) is
        on the meta device with the run's LoRA adapters added by the policy's own code; no VAE or text encoder."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

        from mtflow.models.kontext import KontextPolicy

        p = self.policy
        config = dict(self.configs["transformer"].values)
        config["num_layers"] = self.double_blocks if double is None else double
        config["num_single_layers"] = self.single_blocks if single is None else single
        policy = KontextPolicy(
            p.pretrained,
            dtype=p.dtype_name,
            resolution=p.resolution,
            guidance_scale=p.guidance_scale,
            max_sequence_length=p.max_sequence_length,
            lora_rank=p.lora_rank,
            lora_alpha=p.lora_alpha,
            lora_targets=list(p.lora_targets),
            gradient_checkpointing=p.gradient_checkpointing,
        )
        policy.transformer = build_on_meta("transformer", config, p.model_dtype)
        # the pipeline supplies packing and position ids; no tokenizer or encoder is needed for the velocity
        with torch.device("meta"):
            vae = self.component("vae")
        pipe = FluxKontextPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=policy.transformer,
        )
        policy.vae = vae
        object.__setattr__(policy, "_pipeline", pipe)
        if p.lora_rank > 0:
            with torch.device("meta"):
                policy._add_lora_adapters(list(adapters))
        if p.gradient_checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        return policy

    # ------------------------------------------------------------------ passes on fake tensors
    def velocity_pass(self, policy, batch: int, train: bool) -> Callable[[], None]:
        """One ``policy.velocity`` call on ``batch`` samples (with backward of the sum when ``train``); create the
        inputs inside the ``FakeTensorMode`` that runs it."""
        dtype = self.policy.model_dtype
        text_tokens = self.policy.max_sequence_length

        def run() -> None:
            x = torch.randn(batch, self.tokens, self.channels)
            reference = torch.randn(batch, self.tokens, self.channels)
            text = TextEmbeddings(
                ["x"],
                torch.randn(1, text_tokens, self.text_width, dtype=dtype),
                torch.randn(1, self.pooled_width, dtype=dtype),
                torch.zeros(text_tokens, 3, dtype=dtype),
            )
            index = torch.zeros(batch, dtype=torch.long)
            policy.transformer.train(train)
            with torch.set_grad_enabled(train):
                velocity = policy.velocity(x, torch.tensor(0.5), reference, text, index)
                if train:
                    velocity.sum().backward()

        return run

    def vae_pass(self, vae: nn.Module, batch: int, decode: bool) -> Callable[[], None]:
        side = self.policy.resolution
        latent = side // self.vae_scale
        dtype = self.policy.model_dtype

        def run() -> None:
            with torch.no_grad():
                if decode:
                    vae.decode(torch.randn(batch, self.latent_channels, latent, latent, dtype=dtype))
                else:
                    vae.encode(torch.randn(batch, 3, side, side, dtype=dtype)).latent_dist.mode()

        return run

    # ------------------------------------------------------------------ FLOP model
    def flux_arch(self) -> FluxArch:
        t = self.configs["transformer"].values
        return FluxArch(
            hidden=int(t["num_attention_heads"]) * int(t["attention_head_dim"]),
            double_blocks=self.double_blocks,
            single_blocks=self.single_blocks,
            in_channels=self.channels,
            text_dim=self.text_width,
            pooled_dim=self.pooled_width,
            guidance_embed=bool(t.get("guidance_embeds", True)),
        )

    def t5_arch(self) -> T5Arch:
        c = self.configs["text_encoder_2"].values
        return T5Arch(
            layers=int(c["num_layers"]),
            d_model=int(c["d_model"]),
            d_ff=int(c["d_ff"]),
            inner=int(c["num_heads"]) * int(c["d_kv"]),
        )


register_planner("mtflow.models.kontext.KontextPolicy", KontextPlanner)
