"""PEFT's methods on a melded model, so that code written for a PeftModel (and the Hugging Face
Trainer, TRL's SFTTrainer) works on it unchanged. falqon.meld and falqon.from_pretrained install
them on the model instance:

  model.save_pretrained(dir)        falqon's checkpoint (falqon.save_pretrained), which
                                    falqon.from_pretrained(base_model, dir) loads, instead of
                                    transformers' state dict of FP8 [W; A] rows that no
                                    transformers model can load. The Trainer's save_model and its
                                    checkpoints call this method, so they are falqon checkpoints
                                    too (with the Trainer's optimizer and scheduler state beside
                                    them), and `falqon export` reads them.
  model.print_trainable_parameters()
  model.get_nb_trainable_parameters()   PEFT's, counting every parameter once.

A Trainer resuming from such a checkpoint (trainer.train(resume_from_checkpoint=...)) loads a
transformers index file that the method writes beside falqon's files, model.safetensors.index.json:
it maps the keys of the melded model's state dict that falqon_model.safetensors holds (lora_B, the
scales, the amax history, the proxy mode's FP8 weights: what training changes) to that file, the
one tensor file written whatever max_shard_size says. Every key it lists is in the file it names,
as transformers' and falqon's own readers of an index require; the frozen weights are the base
model's, already in the model in memory, and listed under the index's metadata
("falqon_frozen_keys"), so transformers' resume names them as missing keys (a warning) and leaves
them as they are. FalqonCallback rebuilds the transposed FP8 copies after such a load. No
config.json is written: the directory is not a transformers model
(AutoModelForCausalLM.from_pretrained refuses it for want of one).
"""

from __future__ import annotations

import json
import os
import pathlib
import weakref

from torch import nn

from . import peft_compat, update_guard

INDEX_FILE = "model.safetensors.index.json"  # transformers' SAFE_WEIGHTS_INDEX_NAME


def save_pretrained(model: nn.Module, save_directory, is_main_process: bool = True,
                    state_dict=None, push_to_hub: bool = False, **kwargs) -> None:
    """PEFT's / transformers' save_pretrained on a melded model: falqon's checkpoint and the
    Trainer's resume index (see the module's doc). `state_dict`, `safe_serialization`,
    `max_shard_size` and the like are accepted for transformers' callers and ignored: the
    checkpoint is always falqon's safetensors, one file, unsharded."""
    from safetensors import safe_open

    from .checkpoint import MODEL_FILE, save_pretrained as falqon_save

    if push_to_hub:
        raise ValueError("falqon: save_pretrained(push_to_hub=True) is not supported; upload the "
                         "directory with huggingface_hub")
    if not is_main_process:
        return
    falqon_save(model, save_directory)
    directory = pathlib.Path(save_directory)
    with safe_open(str(directory / MODEL_FILE), framework="pt") as f:
        held = set(f.keys())
    keys = list(model.state_dict())
    index = {"metadata": {"format": "falqon", "note": "falqon checkpoint: load it with "
                          "falqon.from_pretrained(base_model, dir); this index lets a Trainer "
                          "resume into the melded model (the frozen weights are the base "
                          "model's)", "falqon_frozen_keys": [k for k in keys if k not in held]},
             "weight_map": {key: MODEL_FILE for key in keys if key in held}}
    tmp = directory / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, directory / INDEX_FILE)


class _Method:
    """fn bound to a model through a weak reference: a bound method in the model's __dict__ would
    make a reference cycle that keeps its (GPU) memory until the garbage collector runs. A deep
    copy of the model gets its own."""

    def __init__(self, fn, model: nn.Module):
        self.fn, self.ref = fn, weakref.ref(model)
        self.__doc__ = fn.__doc__

    def __call__(self, *args, **kwargs):
        return self.fn(self.ref(), *args, **kwargs)

    def __deepcopy__(self, memo):
        model = self.ref()
        return _Method(self.fn, memo.get(id(model), model))


def install(model: nn.Module) -> None:
    """Bind the methods above to the melded model and arm the proxy mode's update guard."""
    for name, fn in (("save_pretrained", save_pretrained),
                     ("print_trainable_parameters", peft_compat.print_trainable_parameters),
                     ("get_nb_trainable_parameters", peft_compat.nb_trainable_parameters)):
        object.__setattr__(model, name, _Method(fn, model))
    update_guard.install(model)


METHODS = ("save_pretrained", "print_trainable_parameters", "get_nb_trainable_parameters")


def uninstall(model: nn.Module) -> None:
    """Undo install (falqon.merge: the merged model is a plain model again)."""
    for name in METHODS:
        if isinstance(model.__dict__.get(name), _Method):
            del model.__dict__[name]
    update_guard.uninstall(model)


__all__ = ["INDEX_FILE", "install", "save_pretrained", "uninstall"]
