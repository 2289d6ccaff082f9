"""falqon.attach and FalqonCallback: one proxy update per real optimizer step, whatever the loop
does around it (gradient accumulation, clipping, autocast, checkpointing, skipped steps). The
proxy update is the proxy mode's: these models are melded with update_mode="proxy" unless a
test says otherwise (the adapter mode has nothing to run after a step)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import falqon
from falqon import FalqonConfig, MeldedLinear
from falqon.training import enable_gradient_checkpointing, proxy_state
from workflow_testing import tiny_causal_lm


def small_model(rank=4, update_mode="proxy", **cfg):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(),
                          nn.Linear(48, 32))
    return falqon.meld(model, FalqonConfig(rank=rank, exclude_modules=None,
                                           update_mode=update_mode, **cfg),
                       progress=False, verbose=False)


def weights(model):
    return [m.weight.detach().view(torch.uint8).clone() for m in model.modules()
            if isinstance(m, MeldedLinear)]


def b_params(model):
    return [m.lora_B for m in model.modules() if isinstance(m, MeldedLinear)]


def train(model, batches, hook: bool, micro=1, clip=None, autocast=False, steps=3):
    """AdamW steps over `batches`, `micro` micro-batches per step; the proxy update runs through
    falqon.attach (hook=True) or is called by hand after each step (the reference)."""
    opt = torch.optim.AdamW(b_params(model), lr=0.05)
    handle = falqon.attach(opt, model) if hook else None
    it = iter(batches)
    for _ in range(steps):
        for _ in range(micro):
            x, y = next(it)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = (model(x).float() - y).pow(2).mean() / micro
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(b_params(model), clip)
        opt.step()
        if not hook:
            for m in model.modules():
                if isinstance(m, MeldedLinear):
                    m.proxy_update(model.falqon_config.topk_at(proxy_state(model).step, m.rank))
            proxy_state(model).step += 1
        opt.zero_grad()
    if handle:
        handle.remove()
    return model


def batches(n):
    return [(torch.randn(16, 32), torch.randn(16, 32)) for _ in range(n)]


@pytest.mark.parametrize("micro, clip, autocast", [
    (1, None, False),   # plain
    (3, None, False),   # gradient accumulation: one update per optimizer step, not per backward
    (1, 1e-3, False),   # clipping active (max norm far below the gradients' norm)
    (2, 1e-3, True),    # all of it under CPU bf16 autocast
])
def test_attach_equals_a_manual_update_after_each_step(micro, clip, autocast):
    data = batches(3 * micro)
    model = small_model(topk=3, warmup_steps=1)
    start = weights(model)
    hooked = train(copy.deepcopy(model), data, hook=True, micro=micro, clip=clip,
                   autocast=autocast)
    manual = train(copy.deepcopy(model), data, hook=False, micro=micro, clip=clip,
                   autocast=autocast)
    assert proxy_state(hooked).step == 3
    for h, m, s in zip(weights(hooked), weights(manual), start):
        assert torch.equal(h, m)
        assert not torch.equal(h, s)  # the weights did move
    for b in b_params(hooked):
        assert torch.count_nonzero(b) == 0  # the drop policy zeroes B after each update
    if clip is not None:  # clipping changes the result: the test would notice a missing clip
        unclipped = train(copy.deepcopy(model), data, hook=True, micro=micro, clip=None,
                          autocast=autocast)
        assert any(not torch.equal(a, b) for a, b in zip(weights(unclipped), weights(hooked)))


def test_warmup_topk_then_topk(monkeypatch):
    model = small_model(rank=8, topk=2, warmup_steps=2)
    seen = []
    real = MeldedLinear.proxy_update
    monkeypatch.setattr(MeldedLinear, "proxy_update",
                        lambda self, k=None: (seen.append(k), real(self, k))[1])
    train(model, batches(4), hook=True, steps=4)
    assert seen == [8] * 6 + [2] * 6  # three layers, two warm-up steps at k = rank


def test_keep_residual_leaves_unapplied_rows():
    model = small_model(topk=1, keep_residual=True)
    train(model, batches(1), hook=True, steps=1)
    for b in b_params(model):
        assert torch.count_nonzero(b.abs().sum(1)) == b.shape[0] - 1  # one row folded in


def test_nan_step_changes_no_weight():
    model = small_model()
    opt = torch.optim.AdamW(b_params(model), lr=0.05)
    handle = falqon.attach(opt, model)
    before = weights(model)
    x, y = batches(1)[0]
    with pytest.warns(RuntimeWarning, match="non-finite lora_B"):
        ((model(x) - y).pow(2).mean() * float("nan")).backward()
        opt.step()  # a plain optimizer steps with NaN gradients and writes NaN into B
    assert all(torch.equal(a, b) for a, b in zip(weights(model), before))
    assert all(torch.count_nonzero(b) == 0 for b in b_params(model))
    assert proxy_state(model).step == 0 and proxy_state(model).skipped_steps == 1
    for b in b_params(model):  # AdamW's moments were cleared of the NaNs, not left poisoned
        assert all(torch.isfinite(v).all() for v in opt.state[b].values())
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: a second NaN step is silent
        (model(x) - y).pow(2).mean().mul(float("inf")).backward()
        opt.step()
    opt.zero_grad()
    assert proxy_state(model).skipped_steps == 2
    (model(x) - y).pow(2).mean().backward()
    opt.step()  # training goes on normally
    assert proxy_state(model).step == 1
    assert any(not torch.equal(a, b) for a, b in zip(weights(model), before))
    handle.remove()


def test_step_skipped_by_grad_scaler_runs_no_update():
    model = small_model()
    opt = torch.optim.AdamW(b_params(model), lr=0.05)
    falqon.attach(opt, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    before = weights(model)
    x, y = batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the hook is never reached
        scaler.scale((model(x) - y).pow(2).mean() * float("inf")).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(weights(model), before))
    assert proxy_state(model).step == 0 and proxy_state(model).skipped_steps == 0


def test_attach_errors():
    plain = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match="no MeldedLinear layers"):
        falqon.attach(torch.optim.SGD(plain.parameters(), lr=0.1), plain)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    early = torch.optim.AdamW(model.parameters(), lr=0.1)  # built before meld: old parameters
    falqon.meld(model, FalqonConfig(rank=4, exclude_modules=None), progress=False, verbose=False)
    with pytest.raises(ValueError, match="does not hold the lora_B of 2 of 2"):
        falqon.attach(early, model)
    opt = torch.optim.AdamW(b_params(model), lr=0.1)
    handle = falqon.attach(opt, model)
    with pytest.raises(ValueError, match="already has a proxy-update hook"):
        falqon.attach(opt, model)
    handle.remove()
    falqon.attach(opt, model).remove()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        falqon.attach(object(), model)


@pytest.mark.parametrize("mode", ["adapter", "proxy"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant, mode):
    model = tiny_causal_lm("llama")
    falqon.meld(model, FalqonConfig(rank=4, update_mode=mode), progress=False, verbose=False)
    with torch.no_grad():  # a trained adapter, so that B's path through the forward counts
        for p in b_params(model):
            p.normal_(std=0.05)
    model.train()
    twin = copy.deepcopy(model)
    enable_gradient_checkpointing(twin, reentrant=reentrant)
    x = torch.randint(0, 272, (2, 16))
    for m in (model, twin):
        m(input_ids=x).logits.float().logsumexp(-1).mean().backward()
    for (name, a), b in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad),
                            (p for p in twin.parameters() if p.requires_grad)):
        assert b.grad is not None and torch.count_nonzero(b.grad) > 0, name
        # The recomputed forward is the same computation: the gradients agree to float32
        # rounding (only the summation order of the backward can differ).
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def test_adapter_mode_steps_fold_nothing_and_keep_B():
    model = small_model(update_mode="adapter")
    start = weights(model)
    trained = train(copy.deepcopy(model), batches(3), hook=True, steps=3)
    assert proxy_state(trained).step == 3, "attach counts the steps (checkpoints carry them)"
    assert all(torch.equal(a, b) for a, b in zip(weights(trained), start)), "W' never changes"
    assert all(torch.count_nonzero(b) > 0 for b in b_params(trained)), "B is the adapter"


def test_trainer_callback_with_gradient_accumulation(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_causal_lm("llama")
    falqon.meld(model, FalqonConfig(rank=4, topk=4, update_mode="proxy"), progress=False,
                verbose=False)
    before = weights(model)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (12, 16)).tolist()]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=0.05, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   callbacks=[falqon.FalqonCallback()])
    trainer.train()
    assert proxy_state(model).step == 3  # once per optimizer step, not per micro-batch
    assert any(not torch.equal(a, b) for a, b in zip(weights(model), before))
    assert all(torch.count_nonzero(b) == 0 for b in b_params(model))
    # A Trainer resumed from its own checkpoint restores global_step: the callback takes the
    # proxy-update counter (and so the warm-up k) from it.
    state = transformers.TrainerState(global_step=7)
    falqon.FalqonCallback().on_train_begin(args, state, transformers.TrainerControl(),
                                           model=model, optimizer=trainer.optimizer)
    assert proxy_state(model).step == 7
    opt = torch.optim.AdamW(b_params(model), lr=0.1)
    handle = falqon.attach(opt, model)  # both at once would update twice per step
    with pytest.raises(ValueError, match="already has a proxy-update hook"):
        transformers.Trainer(model=model, args=args, train_dataset=rows,
                             callbacks=[falqon.FalqonCallback()]).train()
    handle.remove()
