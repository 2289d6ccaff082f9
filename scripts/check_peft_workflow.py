"""A PEFT user's workflow on the current device (GPU if any), for a quick check after changes:
LoraConfig meld, the Trainer in bf16 with checkpoints, from_pretrained of a checkpoint, the proxy
mode's forgotten-update warning with a fused AdamW, and a proxy step's time with the guard.
    PYTHONPATH=. python scripts/check_peft_workflow.py"""
import sys, time, warnings, torch, transformers as T, peft, falqon
sys.path.insert(0, "tests"); from workflow_testing import tiny_causal_lm
OUTDIR = __import__("tempfile").mkdtemp()
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = tiny_causal_lm().to(dev, torch.bfloat16)
falqon.meld(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), progress=False)
m.print_trainable_parameters()
rows = [{"input_ids": x, "labels": x} for x in torch.randint(0, 256, (32, 64)).tolist()]
a = T.TrainingArguments(output_dir=OUTDIR, max_steps=8, per_device_train_batch_size=4, learning_rate=2e-4, bf16=dev == "cuda", report_to=[], save_steps=4, logging_steps=4, disable_tqdm=True, use_cpu=dev == "cpu")
tr = T.Trainer(model=m, args=a, train_dataset=rows); tr.train()
b = falqon.from_pretrained(tiny_causal_lm().to(dev, torch.bfloat16), OUTDIR + "/checkpoint-8")
print("B equal:", all(torch.equal(x.lora_B, y.lora_B) for (_, x), (_, y) in zip(falqon.melded_layers(b), falqon.melded_layers(m))))
p = tiny_causal_lm().to(dev, torch.bfloat16)
falqon.meld(p, falqon.FalqonConfig(r=16, update_mode="proxy"), progress=False, verbose=False)
opt = torch.optim.AdamW([q for q in p.parameters() if q.requires_grad], lr=1e-3, fused=dev == "cuda")
ids = torch.randint(0, 256, (4, 64), device=dev)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for _ in range(2):
        p(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
print("forgotten-update warnings:", sum("no proxy update" in str(x.message) for x in w))
h = falqon.attach(opt, p)
for _ in range(3):
    p(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
torch.cuda.synchronize() if dev == "cuda" else None
t = time.perf_counter()
for _ in range(20):
    p(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
torch.cuda.synchronize() if dev == "cuda" else None
print(f"proxy step with guard: {(time.perf_counter() - t) / 20 * 1e3:.2f} ms")
