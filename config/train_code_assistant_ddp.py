# Several GPUs under DDP, the seed's 4-GPU run:
#   torchrun --standalone --nproc_per_node=4 train.py config/train_code_assistant_ddp.py
from config.train_code_assistant import *  # noqa: F401,F403  (inherit everything, then override)

# gradient_accumulation_steps counts micro-batches over ALL processes: train.py divides it by
# the world size (an error if it does not divide), so a step is the same size however many
# GPUs run it. With 4 GPUs each accumulates 8 / 4 = 2 micro-batches of 16 sequences:
#   16 sequences x 2 micro-steps x 4 GPUs = 128 sequences = 8 x 4 x 4,
# i.e. the single-GPU config's 8 x 4 = 32 sequences per step, times 4 GPUs. Each step holds
# 128 x 512 = 65,536 tokens, 4x the single-GPU step, so the same max_iters covers 4x the
# tokens in about the single-GPU run's wall time.
batch_size = 16
gradient_accumulation_steps = 2 * 4  # per-GPU micro-steps x number of GPUs
