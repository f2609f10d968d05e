# One GPU, the 124M GPT-2 shape, trained from scratch on the Python code dataset:
#   python train.py config/train_code_assistant.py
# Tokens per step: batch_size 8 x block_size 512 x gradient_accumulation_steps 4 = 16,384.

out_dir = 'out-code-assistant'
eval_interval = 500
eval_iters = 100
log_interval = 10

dataset = 'python_code'
batch_size = 8
block_size = 512  # code wants long context; 512 keeps a step cheap
gradient_accumulation_steps = 4

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # a few epochs at most over this data: no need to regularise

# From scratch, hence nanoGPT's from-scratch rates (not the seed's fine-tuning 5e-5).
# To fine-tune GPT-2 instead: init_from = 'gpt2' needs the Hugging Face weights, which
# cannot be downloaded here; point it at a local directory holding them
# (init_from = '/path/to/gpt2') and lower learning_rate to ~5e-5, min_lr to ~5e-6.
init_from = 'scratch'
learning_rate = 6e-4
min_lr = 6e-5
max_iters = 5000
lr_decay_iters = 5000
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0

device = 'auto'  # cuda when present
dtype = 'auto'  # bf16 autocast where supported, else fp16 + GradScaler
compile = True
