"""Run under torchrun by test_ddp.py: a real 2-process gloo training run, then each rank
writes a fingerprint of its own weights so the test can check the replicas stayed identical."""
import gc
import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from tests.conftest import STUDENT, tiny_config
from trainer.loop import fit

family, run_dir = sys.argv[1], Path(sys.argv[2])
if family == "diffusion-student":  # argv[3]: the teacher; each rank solves its own share of the trajectories
    config = tiny_config("diffusion", run_dir, steps=3, device="cpu",
                         family_options={**STUDENT, "distill_from": sys.argv[3]})
else:
    config = tiny_config(family, run_dir, steps=3, device="cpu")
result = fit(config, progress=False)
digest = hashlib.sha256()
for _, net in sorted(result.family.nets.items()):
    for key, value in sorted(net.named_parameters()):  # buffers (BN stats) are rank-local by design
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
(run_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps({"sha256": digest.hexdigest(),
                                                                  "losses": result.losses}))
# release the DDP wrappers (their reducers hold the process group) and let both ranks finish
# writing before the group goes away; destroying it under live reducers can abort at exit
result.family.train_nets = dict(result.family.nets)
del result
gc.collect()
dist.barrier()
dist.destroy_process_group()
