"""Device backends: O_DIRECT file or block device, batches through native AIO or
threads (io_uring and SPDK later)."""

from wqs.nvme.device import BlockDevice, DirectDevice, aligned_buffer

__all__ = ["BlockDevice", "DirectDevice", "aligned_buffer"]
