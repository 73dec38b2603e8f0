"""Process-group lifecycle of the training runs (modan_ext.training.launch)."""
import gc
import weakref

import torch.distributed as dist

from modan_ext.training import launch


class _Cycle:
    """Stands in for a finished DistributedDataParallel model: unreachable, but in a reference
    cycle, so only the cycle collector frees it (and the process group it holds)."""

    def __init__(self):
        self.me = self


def test_shutdown_frees_cyclic_garbage_before_destroying_the_group(monkeypatch):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    alive_at_destroy = []
    destroy = dist.destroy_process_group

    def recording_destroy(*args, **kwargs):
        alive_at_destroy.append(ref() is not None)
        return destroy(*args, **kwargs)

    monkeypatch.setattr(launch.tdist, "destroy_process_group", recording_destroy)
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection may hide a missing one
    try:
        ref = weakref.ref(_Cycle())
        assert ref() is not None
        launch.shutdown_distributed()
    finally:
        if was_enabled:
            gc.enable()
        if dist.is_initialized():
            destroy()
    # collected after the group was destroyed, gloo aborted the process now and then at exit
    assert alive_at_destroy == [False]
    assert not dist.is_initialized()
