"""The accuracy study of FALQON against full fine-tuning, bf16 LoRA, QLoRA and torchao FP8 LoRA.

Run it as `python -m studies.accuracy --stages ...`; studies/README.md has the protocol and the
commands. Modules: data (corpus, tokenizer, instruction data), methods (the fine-tuning methods,
stochastic rounding, update-mass meter), train (pretraining and fine-tuning loops), report
(results JSON, plots, docs/accuracy.md).
"""
