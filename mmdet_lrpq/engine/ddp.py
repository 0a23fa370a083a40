"""A DistributedDataParallel wrapper that also works for CPU models (gloo).

mmengine always passes ``device_ids=[LOCAL_RANK]``, which torch rejects for CPU modules; on a
machine without CUDA this wrapper drops them. Everything else is mmengine's wrapper.
"""

import torch
from mmengine.model import MMDistributedDataParallel

from ..registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUAwareDistributedDataParallel(MMDistributedDataParallel):
    def __init__(self, module, device_ids=None, **kwargs):
        if not torch.cuda.is_available():
            device_ids = None
        super().__init__(module=module, device_ids=device_ids, **kwargs)
