"""The training recipe: StarChat's supervised fine-tuning (`sft`) and causal-LM pre-training (`pretrain`).

data.py (files -> dialogues) -> tokenization.py (dialogues -> ids + loss labels) -> collate.py
(packing / padding, attention masks) -> loop.py (the optimisation loop, shared by sft.py and
pretrain.py). Models are Hugging Face transformers' GPTBigCodeForCausalLM (training needs
autograd, gradient checkpointing and peft, which our inference network does not have);
checkpoints are written in Hugging Face layout so that our engine serves them directly.
"""
