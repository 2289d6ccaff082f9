"""LoRA fine-tuning of a causal LM with the Hugging Face Trainer (docs/peft_migration.md).

    MODEL=meta-llama/Llama-3.2-1B DATA=train.jsonl OUT=out python SCRIPT.py
DATA: JSON Lines with a "text" field; the adapter is saved in OUT/adapter."""
import json
import os

from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling,
                          Trainer, TrainingArguments)

model_id, out = os.environ["MODEL"], os.environ.get("OUT", "out")
tokenizer = AutoTokenizer.from_pretrained(model_id)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
with open(os.environ["DATA"]) as f:
    texts = [json.loads(line)["text"] for line in f if line.strip()]
train = [tokenizer(t, truncation=True, max_length=512) for t in texts]

model = AutoModelForCausalLM.from_pretrained(model_id)
config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
model = get_peft_model(model, config)
model.print_trainable_parameters()

args = TrainingArguments(output_dir=out, max_steps=int(os.environ.get("STEPS", 1000)),
                         per_device_train_batch_size=8, learning_rate=2e-4, logging_steps=10,
                         save_steps=500, report_to=[])
trainer = Trainer(model=model, args=args, train_dataset=train,
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
trainer.train()
model.save_pretrained(f"{out}/adapter")
