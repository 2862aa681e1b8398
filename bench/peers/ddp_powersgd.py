# PowerSGD + DDP on CPU/gloo. Run: torchrun --nproc-per-node 4 ddp_powersgd.py [--mode pergroup|onebucket]
# Root cause of the gloo abort: powerSGD_hook issues its P/Q all_reduces from future callbacks (gloo
# worker threads) while the autograd thread issues the next bucket's all_reduce on the SAME process
# group; the per-rank issue order (= gloo tag order) then differs between ranks -> size mismatch.
# Fix A (onebucket): one DDP bucket -> no interleaving. Fix B (pergroup): one gloo group per bucket.
import argparse, os, torch, torchvision, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=["pergroup", "onebucket"], default="pergroup")
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--res", type=int, default=32)
a = ap.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gloo")  # torchrun sets MASTER_ADDR/PORT, RANK, WORLD_SIZE
rank = dist.get_rank()
torch.manual_seed(0)
model = torchvision.models.mobilenet_v2(num_classes=10)
state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)

if a.mode == "onebucket":
    # Explicit bucket_cap_mb >= gradient size (MobileNetV2: ~9 MB) => a single bucket
    # (an explicit cap also replaces DDP's 1 MB first-bucket cap used when rebuilding buckets).
    ddp = DDP(model, bucket_cap_mb=64)
    ddp.register_comm_hook(state, psgd.powerSGD_hook)
else:
    ddp = DDP(model)  # default buckets (2 for MobileNetV2 after the iteration-1 rebuild)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_buckets = 2 + nbytes // (25 * 2**20)  # 1 MB first bucket + 25 MB buckets
    groups = [dist.new_group(backend="gloo") for _ in range(max_buckets)]

    def ordered_powerSGD_hook(state, bucket):
        # powerSGD_hook reads state.process_group once, synchronously; its callbacks keep that group.
        if bucket.index() >= len(groups):
            raise RuntimeError("more DDP buckets than process groups")
        state.process_group = groups[bucket.index()]
        return psgd.powerSGD_hook(state, bucket)

    ddp.register_comm_hook(state, ordered_powerSGD_hook)

opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
g = torch.Generator().manual_seed(rank)
for it in range(a.steps):
    x = torch.randn(8, 3, a.res, a.res, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    loss = torch.nn.functional.cross_entropy(ddp(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if rank == 0:
        print(f"iter {it} loss {loss.item():.4f}", flush=True)
# Check replicas stayed identical (PowerSGD result is the same on every rank).
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
ref = flat.clone(); dist.broadcast(ref, 0)
assert torch.equal(flat, ref), f"rank {rank}: parameters diverged"
dist.barrier()
if rank == 0: print(f"OK mode={a.mode} world_size={dist.get_world_size()}", flush=True)
dist.destroy_process_group()
