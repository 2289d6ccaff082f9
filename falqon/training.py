"""The proxy update after every optimizer step, without touching the training loop:
`falqon.attach(optimizer, model)` (an optimizer step post-hook) and `falqon.FalqonCallback`
(a transformers TrainerCallback).

Only the proxy mode (FalqonConfig(update_mode="proxy")) has a proxy update. In the adapter mode
(the default) B is trained like a LoRA adapter and nothing runs after a step: attach and the
callback are harmless there (they only count steps), so a training script serves both modes.

What each optimizer step does to a melded layer (DESIGN.md, "Proxy update"): the optimizer has
just written this step's update into lora_B (which was 0); its top-k rows are folded into the FP8
weight and B is reset. The k of a step follows the config's warm-up (warmup_topk for the first
warmup_steps steps, then topk); the step counter lives on the model (`falqon_state`) so that
checkpoints carry it and a resumed run folds the same rows as an uninterrupted one.

Non-finite steps. A step that is skipped (torch.amp.GradScaler on inf/NaN gradients, or the
Trainer's own skip) never reaches the post-hook, so nothing changes. A plain optimizer, however,
steps with NaN gradients and writes NaN into lora_B: before folding anything, the hook checks that
every B is finite and, if one is not, resets all B's to 0, clears the non-finite entries of their
optimizer state (AdamW's moments would otherwise stay NaN for good) and leaves every weight as it
was; the step is counted as skipped and a warning is given once. (Independently, the op
topk_update_ leaves a weight row unchanged where its update is NaN.) That check reads one flag
back from the device per step; pass check_finite=False to avoid it.

On one CUDA device every layer's update (and the finite check) runs as one grouped op,
ops.topk_update_many_: four launches whatever the number of layers, with the per-layer op's
results bit for bit. Elsewhere (the CPU, layers on several devices, FSDP2 shards) each layer runs
its own topk_update_.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import ops, trained_a, update_guard
from .convert import melded_config, melded_layers
from .modules import is_sharded

STATE_ATTR = "falqon_state"
# Set while an attach() hook is live: a second hook (or FalqonCallback) would update twice.
HOOKED_ATTR = "_falqon_attached"


@dataclass
class ProxyState:
    """Counters of the proxy updates done on a model (saved in checkpoints)."""

    step: int = 0           # optimizer steps whose update was folded into the weights
    skipped_steps: int = 0  # steps discarded because some lora_B was not finite

    def to_dict(self) -> dict:
        return asdict(self)


def proxy_state(model: nn.Module) -> ProxyState:
    """The model's proxy-update counters (created at 0 on first use)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = ProxyState()
        setattr(model, STATE_ATTR, state)
    return state


def unwrap_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's AcceleratedOptimizer."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class ProxyUpdater:
    """Runs the proxy update of every melded layer of a model, once per optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 check_finite: bool = True):
        melded = [layer for _, layer in melded_layers(model)]
        if not melded:
            raise ValueError("falqon: the model has no MeldedLinear layers; call "
                             "falqon.meld(model, config) first")
        # Only the proxy mode's layers have an update to run; the adapter mode's B is trained like
        # LoRA's and needs nothing after a step (the counter still advances, for checkpoints).
        self.layers = [layer for layer in melded if layer.update_mode == "proxy"]
        # The adapter mode with train_a: A's FP8 rows rewritten from lora_A after each step.
        self.trained_a = [layer for layer in melded if layer.lora_A is not None]
        self.all_layers = melded
        self.model = model
        self.config = melded_config(model)
        self.optimizer = optimizer
        self.check_finite = check_finite
        self.grouped_enabled = os.environ.get("FALQON_GROUPED_TOPK", "1") != "0"
        self.state = proxy_state(model)
        self._warned = False
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = sum(id(layer.lora_B) not in held for layer in melded)
            missing_a = sum(id(layer.lora_A) not in held for layer in self.trained_a)
            if missing or missing_a:
                what = f"lora_B of {missing}" if missing else f"lora_A of {missing_a}"
                raise ValueError(
                    f"falqon.attach: the optimizer does not hold the {what} of "
                    f"{len(melded)} melded layers; create it after falqon.meld, e.g. "
                    f"torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])")
        self.set_syncs_a(True)

    def set_syncs_a(self, on: bool) -> None:
        """Tell the trained-A layers whether this updater rewrites their A rows (their eager
        forward does it otherwise, and cannot under FSDP2's unsharded parameters)."""
        for layer in self.trained_a:
            layer._a_synced_by_hook = on

    def k_for(self, layer) -> int:
        if self.config is None:
            return layer.topk
        return self.config.topk_at(self.state.step, layer.rank)

    @torch.no_grad()
    def step(self) -> bool:
        """Fold this step's B into the weights; False (and nothing changed) if a B is not finite."""
        if self.layers and self.grouped():
            # Every layer in one op: on CUDA four launches whatever the layer count, the finite
            # check included (a non-finite B anywhere leaves every weight as it was).
            layers = self.layers
            finite = ops.topk_update_many_(
                [layer.weight for layer in layers], [layer.lora_B for layer in layers],
                [layer.weight_t for layer in layers], [self.k_for(layer) for layer in layers],
                [layer.scaling for layer in layers], [layer.keep_residual for layer in layers],
                discard_nonfinite=self.check_finite)
            if self.check_finite and not bool(finite.all()):  # the one host read-back per step
                self._discard(finite)
                return False
        else:
            if self.check_finite and self.layers:
                finite = torch.stack([torch.isfinite(layer.lora_B).all() for layer in self.layers])
                if not bool(finite.all()):  # the one host read-back per step
                    self._discard(finite)
                    return False
            for layer in self.layers:
                layer.proxy_update(self.k_for(layer))
        if self.trained_a:  # A's FP8 rows from lora_A, grouped (falqon.trained_a.sync_many)
            trained_a.sync_many(self.trained_a)
        update_guard.record(self.model)
        self.state.step += 1
        return True

    def grouped(self) -> bool:
        """Whether step() runs the grouped op (ops.topk_update_many_): every proxy layer's tensors
        on one CUDA device, none of them an FSDP2 shard. Otherwise (the CPU, several devices,
        sharded layers) each layer runs its own update. FALQON_GROUPED_TOPK=0 forces the latter."""
        if not self.grouped_enabled:
            return False
        device = self.layers[0].weight.device
        if device.type != "cuda":
            return False
        for layer in self.layers:
            for t in (layer.weight, layer.lora_B, layer.weight_t):
                if t is not None and (t.device != device or is_sharded(t)):
                    return False
        return True

    def _discard(self, finite: torch.Tensor) -> None:
        bad = (~finite).nonzero().flatten().tolist()
        for layer in self.layers:
            layer.lora_B.zero_()
        update_guard.record(self.model)
        if self.optimizer is not None:
            for i in bad:
                for value in self.optimizer.state.get(self.layers[i].lora_B, {}).values():
                    if torch.is_tensor(value) and value.is_floating_point():
                        value.masked_fill_(~torch.isfinite(value), 0)
        self.state.skipped_steps += 1
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"falqon: non-finite lora_B after an optimizer step in {len(bad)} layer(s): the "
                f"step's update was discarded (B reset to 0, weights unchanged, non-finite "
                f"optimizer state cleared). Further such steps are counted in "
                f"model.falqon_state.",
                RuntimeWarning, stacklevel=3)


class FalqonHandle:
    """What falqon.attach returns: remove() detaches the hook."""

    def __init__(self, updater: ProxyUpdater, hook_handle):
        self.updater = updater
        self._hook = hook_handle

    @property
    def state(self) -> ProxyState:
        return self.updater.state

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self.updater.set_syncs_a(False)
            setattr(self.updater.model, HOOKED_ATTR, False)


def attach(optimizer: torch.optim.Optimizer, model: nn.Module,
           check_finite: bool = True) -> FalqonHandle:
    """Run the proxy update of every melded layer after each `optimizer.step()`.

    Registers an optimizer step post-hook (on the torch optimizer inside wrappers such as
    accelerate's), so gradient accumulation, clipping and autocast need nothing else: the hook
    runs once per real optimizer step, and never for a step that GradScaler skipped."""
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"falqon.attach takes a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    _check_not_attached(model)
    updater = ProxyUpdater(model, inner, check_finite)
    setattr(model, HOOKED_ATTR, True)
    hook = inner.register_step_post_hook(lambda opt, args, kwargs: updater.step())
    return FalqonHandle(updater, hook)


def _check_not_attached(model: nn.Module) -> None:
    if getattr(model, HOOKED_ATTR, False):
        raise ValueError("falqon: this model already has a proxy-update hook from falqon.attach; "
                         "a second one (or FalqonCallback) would update the weights twice per "
                         "step. Call handle.remove() first")


def _make_callback_class():
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError("falqon.FalqonCallback needs transformers (pip install transformers)") \
            from exc

    class FalqonCallback(TrainerCallback):
        """transformers TrainerCallback: the proxy update after each optimizer step.

            trainer = Trainer(model=falqon.meld(model, cfg), ..., callbacks=[FalqonCallback()])

        on_optimizer_step runs once per real optimizer step (after gradient accumulation and
        clipping); a step that the Trainer's GradScaler skipped is left alone."""

        def __init__(self, check_finite: bool = True):
            self.check_finite = check_finite
            self._updater = None

        def _get(self, model, optimizer):
            if self._updater is None or self._updater.model is not model:
                self._updater = ProxyUpdater(model, unwrap_optimizer(optimizer)
                                             if optimizer is not None else None,
                                             self.check_finite)
            return self._updater

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if model is not None:
                _check_not_attached(model)
                updater = self._get(model, optimizer)  # fails early on an unmelded model
                # A Trainer resumed from its checkpoint restores global_step, not the model's
                # proxy-update counter: take it from there so the warm-up k stays in step.
                updater.state.step = max(updater.state.step, state.global_step)
                # A Trainer resume loads the checkpoint's tensors with load_state_dict: rebuild
                # the transposed FP8 copies from the loaded weights, a trained A's FP8 rows from
                # the loaded lora_A (its checkpoint keeps them as adapter_A, which is no state
                # dict key), and take the loaded B as not pending (falqon.update_guard).
                for layer in updater.all_layers:
                    layer.refresh_weight_t()
                for layer in updater.trained_a:
                    layer.sync_adapter_A()
                update_guard.record(model)

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            if model is None:
                raise ValueError("FalqonCallback: the Trainer passed no model to on_optimizer_step")
            if getattr(optimizer, "step_was_skipped", False):
                return  # accelerate's GradScaler skipped this step: B holds no update
            self._get(model, optimizer).step()

    FalqonCallback.__qualname__ = "FalqonCallback"
    FalqonCallback.__module__ = __name__
    return FalqonCallback


# ---- the fine-tuning loop of `falqon finetune` --------------------------------------------------

def lr_at(step: int, lr: float, steps: int, warmup: int, schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over `warmup` steps, then
    constant or cosine decay to 10% of `lr` at the last step."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(steps - warmup - 1, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def lm_loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross entropy over the labelled tokens, their count), both device
    tensors (nothing is read back to the host)."""
    from .fusion import fusion_report

    report = fusion_report(model)
    if model.training and report is not None and report.fused_loss:
        # falqon.fuse's fused linear cross-entropy (no logits): the model's own loss, shifted as
        # below; num_items_in_batch=1 makes it the sum (transformers' and Liger's convention).
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"], num_items_in_batch=1).loss
        return loss, (batch["labels"][:, 1:] != -100).sum()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=-100, reduction="sum")
    return loss, (labels != -100).sum()


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    """Mean next-token loss per labelled token over `batches` (an iterable of collated dicts)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = lm_loss_sum(model, batch)
        total += float(loss)
        count += int(n)
    model.train(was_training)
    return total / max(count, 1)


def enable_gradient_checkpointing(model: nn.Module, reentrant: bool = False) -> None:
    """transformers' activation checkpointing, under its old or new method name."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")


def __getattr__(name):
    # FalqonCallback subclasses transformers.TrainerCallback: built on first use so that
    # `import falqon` does not import transformers.
    if name == "FalqonCallback":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FalqonCallback", "FalqonHandle", "ProxyState", "ProxyUpdater", "attach",
           "enable_gradient_checkpointing", "evaluate", "lm_loss_sum", "lr_at", "proxy_state",
           "unwrap_optimizer"]
