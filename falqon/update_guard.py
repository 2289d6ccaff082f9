"""The proxy mode's update cannot be forgotten silently.

In the proxy mode (FalqonConfig(update_mode="proxy")) B never enters the forward: an optimizer
step writes its update into lora_B and only the proxy update (falqon.attach, FalqonCallback or
layer.proxy_update()) folds it into the FP8 weights. Without it nothing trains: B grows, the loss
stays, and a save or export holds W without the updates. So falqon watches for it:

- A global optimizer step post-hook (torch.optim's register_optimizer_step_post_hook, installed
  when the first proxy-mode model is melded) marks each proxy-mode layer whose lora_B the
  stepping optimizer holds, with B's version counter (torch's `_version`, which every in-place
  write bumps except fused optimizers'). A model with a falqon.attach hook is left alone: that
  hook has just run its update.
- The proxy update clears the marks (ProxyUpdater); a layer.proxy_update() called by hand writes
  B, so B's version moves past the mark, which clears it too.
- A melded proxy-mode model gets a forward pre-hook: in training mode, a marked layer means an
  optimizer step ran without the proxy update. It warns once per model, then stops checking.
  It costs a flag's read per forward (a look at the layers after a step) and never reads from
  the device; under torch.compile it is skipped.
- save_pretrained and export in the proxy mode warn the same way when a layer is marked.
The adapter mode needs nothing after a step (B is the adapter), so none of this applies to it.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

MARK_ATTR = "_falqon_stepped_version"
LAYERS_ATTR = "_falqon_proxy_layers"  # on the model: [(name, layer)], set by install
FLAG_ATTR = "_falqon_marked"          # on the model: some layer may be marked
WARNED_ATTR = "_falqon_guard_warned"
FIX = ("call falqon.attach(optimizer, model) once after creating the optimizer, or pass "
       "callbacks=[falqon.FalqonCallback()] to the Trainer (or call layer.proxy_update() after "
       "each optimizer step)")
_GUARDED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_global_hook = None


def _proxy_layers(model: nn.Module):
    layers = model.__dict__.get(LAYERS_ATTR)
    if layers is None:
        from .convert import melded_layers

        layers = [(n, m) for n, m in melded_layers(model) if m.update_mode == "proxy"]
    return layers


def record(model: nn.Module) -> None:
    """The proxy update ran: nothing in the model's B is pending."""
    for _, layer in _proxy_layers(model):
        setattr(layer, MARK_ATTR, None)
    object.__setattr__(model, FLAG_ATTR, False)


def _after_any_step(optimizer, args, kwargs) -> None:
    """Mark the guarded models' proxy-mode layers that this optimizer step wrote."""
    from .training import HOOKED_ATTR

    models = [m for m in list(_GUARDED) if not getattr(m, HOOKED_ATTR, False)]
    if not models:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in models:
        for _, layer in _proxy_layers(model):
            if id(layer.lora_B) in held:
                setattr(layer, MARK_ATTR, layer.lora_B._version)
                object.__setattr__(model, FLAG_ATTR, True)


def pending(model: nn.Module) -> list[str]:
    """Names of the proxy-mode layers whose lora_B holds an optimizer update that no proxy update
    folded in (marked by a step, and not written since)."""
    if not model.__dict__.get(FLAG_ATTR, False):
        return []
    out = []
    for name, layer in _proxy_layers(model):
        mark = getattr(layer, MARK_ATTR, None)
        if mark is None:
            continue
        if layer.lora_B._version == mark:
            out.append(name or "the layer")
        else:  # written since the step: a proxy update by hand
            setattr(layer, MARK_ATTR, None)
    if not out:
        object.__setattr__(model, FLAG_ATTR, False)
    return out


def _warn_once(model: nn.Module, kind: str, message: str) -> None:
    warned = getattr(model, WARNED_ATTR, None)
    if warned is None:
        warned = set()
        object.__setattr__(model, WARNED_ATTR, warned)
    if kind not in warned:
        warned.add(kind)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _layers_text(names: list[str]) -> str:
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    return f"{len(names)} proxy-mode layer(s) ({', '.join(names[:2])}{more})"


def check_before_write(model: nn.Module, what: str) -> None:
    """Warn once if `what` (save_pretrained, export) is about to write a model whose lora_B holds
    updates that never reached the FP8 weights."""
    names = pending(model)
    if names:
        _warn_once(model, what,
                   f"falqon: {what}: lora_B of {_layers_text(names)} holds optimizer updates "
                   f"that no proxy update folded into the FP8 weights, so the weights written "
                   f"are untrained; {FIX}")


def _pre_hook(model: nn.Module, args) -> None:
    if not model.training or "forward" in getattr(model, WARNED_ATTR, ()) or \
            torch.compiler.is_compiling():
        return
    names = pending(model)
    if names:
        _warn_once(model, "forward",
                   f"falqon: an optimizer step changed lora_B of {_layers_text(names)} but no "
                   f"proxy update followed it: in the proxy mode B never enters the forward, "
                   f"so nothing trains (B grows, the loss stays); {FIX}")


def install(model: nn.Module) -> None:
    """Guard a melded model with proxy-mode layers: its forward (once; the hook stops checking
    after its warning) and, for all such models, every optimizer step."""
    global _global_hook
    model.__dict__.pop(LAYERS_ATTR, None)
    layers = _proxy_layers(model)
    object.__setattr__(model, LAYERS_ATTR, layers)
    record(model)
    if not layers:
        return
    _GUARDED.add(model)
    if _global_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _global_hook = register_optimizer_step_post_hook(_after_any_step)
    if _pre_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_pre_hook)


def uninstall(model: nn.Module) -> None:
    _GUARDED.discard(model)
    model.__dict__.pop(LAYERS_ATTR, None)
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _pre_hook:
            del model._forward_pre_hooks[key]


__all__ = ["check_before_write", "install", "pending", "record", "uninstall"]
