"""Streamed training data (litdata's StreamingDataset): its loader's position is part of the checkpoint, so that a
resume skips exactly the samples already seen.

litdata assigns chunks to ranks and loader workers and shuffles by seed and epoch; its loader counts the samples it
has handed out (state_dict). On the world size, loader workers and micro-batch a checkpoint was saved with, a resume
replays the same order from there: bit-identical to a run that was never stopped. On another world size (or number of
workers) litdata restripes what is left of the epoch over the new ranks: no sample of the epoch is seen twice or lost
(up to a micro-batch per rank at its end), but the samples of a step differ from an unstopped run's. Chunks that
moved (another folder, an object store) resume if they are the same chunks; other chunks are refused.
"""

from itertools import islice

import torch
from lightning.fabric import Fabric
from torch.utils.data import Dataset, IterableDataset

from utils.batching import BatchPlan, optimizer_steps
from utils.exits import fail


def is_streaming(dataset: Dataset) -> bool:
    """Whether `dataset` is litdata's StreamingDataset (litdata is imported only for an IterableDataset)."""
    if not isinstance(dataset, IterableDataset):
        return False
    from litdata import StreamingDataset

    return isinstance(dataset, StreamingDataset)


class StreamedSteps:
    """The optimizer steps of a StreamingDataset, accum_steps micro-batches each. An epoch is as many steps as the rank
    with the fewest samples can make, so that every rank makes the same number; each epoch starts litdata's epoch of
    the same number (its shuffle), whether the run was stopped in between or not. A stateful object: its state_dict
    is litdata's position, saved with the checkpoint."""

    def __init__(self, fabric: Fabric, dataset, batches: BatchPlan, settings: dict, seed: int):
        from litdata import StreamingDataLoader

        # drop_last: every micro-batch is whole; the generator keeps workers' seeds from drawing on the global RNG
        self.loader = StreamingDataLoader(dataset, batch_size=batches.micro, drop_last=True, **settings,
                                          generator=torch.Generator().manual_seed(seed))
        steps = torch.tensor(len(self.loader) // batches.accum_steps, device=fabric.device)
        self.steps_per_epoch = int(fabric.all_reduce(steps, reduce_op="min")) if fabric.world_size > 1 \
            else int(steps)  # all ranks
        self.fabric, self.accum_steps = fabric, batches.accum_steps
        self.dataset_size = len(dataset) * fabric.world_size  # litdata's len is this rank's share

    def epoch(self, epoch: int, steps_done: int):
        """The micro-batches of each step of `epoch` after its first `steps_done`, on this rank's device. Mid-epoch
        (steps_done > 0) only right after load_state_dict: litdata then continues from the checkpoint's position. A
        stream that ends before the epoch's steps do stops the run (exit 1)."""
        if steps_done == 0:  # a fresh epoch: litdata's __iter__ counts it up from ours
            self.loader.restore, self.loader.current_epoch = False, epoch
        batches = (self.fabric.to_device(batch) for batch in self.loader)
        expected, count = self.steps_per_epoch - steps_done, 0
        for step in islice(optimizer_steps(batches, self.accum_steps), expected):
            count += 1
            yield step
        if count < expected:  # the loop's step count and litdata's would part from here
            fail(f"the streamed epoch {epoch} ended {expected - count} step(s) early on rank "
                 f"{self.fabric.global_rank}: litdata restriped it over fewer samples after a resume on another "
                 f"world size; resume on the world size the checkpoint was saved with", status=1)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """litdata's position; the chunks may have moved (a copy in an object store, say) if they are the same chunks,
        which litdata's own check of their path would refuse."""
        saved, dataset = state["dataset"], self.loader.dataset
        layout = [saved["subsampled_files"], [list(region) for region in saved["region_of_interest"]]]
        if layout != [dataset.subsampled_files, [list(region) for region in dataset.region_of_interest]]:
            fail(f"the checkpoint streamed other chunks ({saved['input_dir_url'] or saved['input_dir_path']}) than "
                 f"this run's ({dataset.input_dir.url or dataset.input_dir.path}): a resumed run reads the same data")
        saved.update(input_dir_path=dataset.input_dir.path, input_dir_url=dataset.input_dir.url,
                     cache_dir_path=dataset.cache_dir.path)
        self.loader.load_state_dict(state)
