"""Multi-process training: process groups, sharded torchrec tables, distributed checkpoints, the torchrun launch.

    merlin-hstu train --task retrieval --data D --output RUN --nproc 2 --set model.embeddings=torchrec

* `context`: the process group of a run started by torchrun (`python -m torch.distributed.run`): gloo on CPU,
  nccl on CUDA; `DistContext` gives rank, world size and the few collectives the loop needs.
* `sharding`: torchrec's `DistributedModelParallel` over a model's torchrec tables (`model.embeddings: torchrec`,
  `merlin_hstu.common.embeddings`) with the planner (`train.sharding`: auto | table_wise | row_wise | column_wise)
  and a fused sparse optimizer for the tables (`train.sparse_optimizer`), DDP for every other parameter.
* `checkpoint`: `torch.distributed.checkpoint` of the sharded tables, dense weights and optimizer states; a
  checkpoint loads on any number of processes (the tables are resharded on load).
* `launch`: `--nproc / --nnodes / --node-rank / --rdzv-endpoint` -> the torchrun command line.

The one training loop (`merlin_hstu.train.loop.fit`) uses them when the process was started by torchrun; a plain
process trains exactly as before. See docs/scaling.md.
"""
