"""Run under torchrun: load a run's latest checkpoint into the DeepSpeed engine and save its logits on
fixed inputs (rank 0 writes OUT). Used to check that an exported model gives the engine's logits."""

import sys

import torch

from cprec.config import load_config
from cprec.train.config import TrainConfig
from cprec.train.loop import Trainer

config, out = sys.argv[1], sys.argv[2]
cfg = load_config(TrainConfig, config, sys.argv[3:] + ["max_steps=0"])
trainer = Trainer(cfg, resume=True)
trainer.engine.eval()
ids = torch.arange(24).remainder(cfg.model.config["vocab_size"] - 1).add(1).view(2, 12)
with torch.no_grad():
    logits = trainer.engine(input_ids=ids.to(trainer.device), use_cache=False).logits
if trainer.rank == 0:
    torch.save({"input_ids": ids, "logits": logits.cpu(), "step": trainer.step}, out)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
