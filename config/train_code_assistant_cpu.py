# No GPU: the best model for ~10 minutes of a 2-core CPU (see platform.md, "Training a small
# GPT on this CPU"): 2 layers x 128 wide reached val loss 3.55 in 10 minutes there; deeper
# or wider models did worse in the same time, because the 50304 x n_embd output layer is
# most of the compute.
#   python train.py config/train_code_assistant_cpu.py
out_dir = 'out-code-assistant'
dataset = 'python_code'

n_layer = 2
n_head = 4
n_embd = 128
block_size = 256
dropout = 0.0
batch_size = 8  # beat 4 and 16 for a fixed time: more optimizer steps
gradient_accumulation_steps = 1

# The clock drives the run: the cosine follows elapsed/max_minutes (machine speed swings
# 10-25%, so a fixed iteration count would end early or late) and training stops at the
# budget. max_iters is only a ceiling. The clock starts after the first step: compilation
# (~55 s on a fresh machine, ~20 s with inductor's cache warm) is start-up, not training.
max_minutes = 10.0
max_iters = 1_000_000
# Small and shallow tolerates a high rate: 6e-3 reached val loss 3.91 where 3e-3 reached 4.17
# (10-minute runs, 2026-11-26; the 3e-3 run shared the cores for ~2 of its minutes). 4 layers
# at 6e-3: 4.03; 2 layers at 1e-2: 3.93. Width >= 256 wanted <= 2e-3.
learning_rate = 6e-3
min_lr = 6e-4
# Muon for the blocks' matrices (AdamW keeps the embedding/output layer): val loss 3.58 in 10
# minutes where AdamW reached 3.91, and 3.73 even with 14.6 minutes (2026-11-26, README). Its
# update is scaled to AdamW's RMS, so the learning rate above serves both.
optimizer = 'muon'
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0

# Evaluation must stay under ~5% of the budget. At ~3.4 steps/s (platform.md: ~7,000 tok/s)
# 500 steps take ~150 s; 2 splits x 20 forward-only batches take ~4 s, plus one compile of the
# no-grad graph (~15-30 s) at the first evaluation. Each eval record in log.jsonl carries its
# duration (eval_s) to check this against the run.
eval_interval = 500
eval_iters = 20
log_interval = 50

device = 'cpu'
dtype = 'auto'  # bf16 autocast on CPUs with native bf16 (AVX-512-BF16/AMX), else fp32
compile = True  # +40-60% here; compiling costs 15-40 s of the budget
