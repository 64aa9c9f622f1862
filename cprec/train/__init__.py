"""Training: continual pre-training and fine-tuning with DeepSpeed ZeRO-3 on the packed data stream, under
the WSA schedule. `loop` holds the Trainer and its config; see its docstring for the other modules' roles."""
