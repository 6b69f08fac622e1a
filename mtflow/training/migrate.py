"""Hyperparameters written by mtflow v0.1, read by this version.

v0.1's ``FlowRLModule`` took ~40 flat arguments (``loss``, ``group_size``, ``clip_eps``, ``nft_beta``, ``adv_clip``,
``eval_num_steps``, ...); they are now typed groups (``algorithm``, ``rollout``, ``advantage``, ``optim``,
``evaluation``). ``mtflow test`` / ``validate`` / ``export`` with a v0.1 checkpoint read its stored hyperparameters
through ``migrate_hparams``. v0.1 saved every argument whatever the loss, so the other algorithm's (ignored) values
are dropped here.
"""

from __future__ import annotations

from typing import Any

GROUPED = {
    "group_size": ("rollout", "group_size"),
    "num_steps": ("rollout", "num_steps"),
    "forward_batch_size": ("rollout", "forward_batch_size"),
    "store_dtype": ("rollout", "store_dtype"),
    "kernels": ("rollout", "kernels"),
    "lambda_cc": ("advantage", "lambda_cc"),
    "aggregation": ("advantage", "aggregation"),
    "fusion": ("advantage", "fusion"),
    "broadcast": ("advantage", "broadcast"),
    "std_mode": ("advantage", "std_mode"),
    "min_group_std": ("advantage", "min_group_std"),
    "adv_clip": ("advantage", "a_max"),
    "lr": ("optim", "lr"),
    "weight_decay": ("optim", "weight_decay"),
    "adam_betas": ("optim", "betas"),
    "max_grad_norm": ("optim", "max_grad_norm"),
    "updates_per_rollout": ("optim", "updates_per_rollout"),
    "max_nonfinite_skips": ("optim", "max_nonfinite_skips"),
    "eval_threshold": ("evaluation", "threshold"),
    "eval_num_steps": ("evaluation", "num_steps"),
    "eval_conditions": ("evaluation", "conditions"),
    "eval_bootstrap": ("evaluation", "bootstrap"),
}
ALGORITHM_ARGS = {
    "grpo": {"noise_level": "noise_level", "stochastic": "stochastic", "window_size": "window_size",
             "clip_eps": "clip_eps", "beta_kl": "beta_kl"},
    "nft": {"nft_beta": "beta", "nft_beta_ref": "beta_ref", "nft_train_timesteps": "train_timesteps",
            "old_adapter_rate": "old_adapter_rate", "old_adapter_max_decay": "old_adapter_max_decay"},
}  # fmt: skip
ALGORITHM_CLASSES = {"grpo": "mtflow.algorithms.GRPO", "nft": "mtflow.algorithms.NFT"}
UNCHANGED = ("ema_decay", "overlap_scoring", "max_iterations", "seed")
V01_ONLY = {"nft_stochastic_rollout"}


def is_v01(hparams: dict[str, Any]) -> bool:
    """v0.1 hyperparameters name the loss (``loss: grpo | nft``) instead of an ``algorithm`` class."""
    return "loss" in hparams and "algorithm" not in hparams


def migrate_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """v0.1's flat module arguments as this version's groups; anything else is returned unchanged."""
    if not is_v01(hparams):
        return hparams
    loss = hparams["loss"]
    if loss not in ALGORITHM_CLASSES:
        raise ValueError(f"v0.1 hyperparameters name an unknown loss {loss!r}; expected 'grpo' or 'nft'")
    known = {"loss", *GROUPED, *UNCHANGED, *V01_ONLY, *(k for args in ALGORITHM_ARGS.values() for k in args)}
    unknown = sorted(k for k in hparams if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(f"v0.1 hyperparameters hold keys this version does not know: {unknown}")
    out: dict[str, Any] = {k: v for k, v in hparams.items() if k.startswith("_") or k in UNCHANGED}
    for key, (group, name) in GROUPED.items():
        if key in hparams:
            out.setdefault(group, {})[name] = hparams[key]
    init_args = {new: hparams[old] for old, new in ALGORITHM_ARGS[loss].items() if old in hparams}
    if loss == "nft":  # v0.1: a flag plus the shared noise level; now one NFT knob (0: ODE rollouts)
        stochastic = bool(hparams.get("nft_stochastic_rollout", False))
        init_args["rollout_noise_level"] = float(hparams.get("noise_level", 0.9)) if stochastic else 0.0
    out["algorithm"] = {"class_path": ALGORITHM_CLASSES[loss], "init_args": init_args}
    return out
