"""Cost of LRP scoring relative to a plain forward + backward of the target logit, side by side.

    .venv/bin/python bench/lrp_speed.py                      # real ImageNet images
    .venv/bin/python bench/lrp_speed.py --synthetic          # random tensors
    .venv/bin/python bench/lrp_speed.py --device cuda        # on a GPU

Builds timm ``swin_tiny_patch4_window7_224`` (random weights, ``always_partition=True``) on
``--device`` (CPU by default). The images are decoded, preprocessed and moved to the device once,
before any timing; on a GPU each timed run ends with a device synchronization. For every batch size
and every batch it times, alternating, ``--repeats`` runs of each mode and keeps each mode's fastest
(other processes on a shared machine slow runs down, never up):

* ``fwdbwd``: ``model(x)``, then ``backward()`` of the sum of the target logits (the predicted
  class, as LRP uses; parameters require grad as built);
* ``lrp``: ``swin_relevance`` on the same batch, the whole per-batch work of ``lrp_site_scores``
  (explicit forward, unit-wise gradients, relevance backward, site scores).

Peak memory (Linux): a fresh child process builds the model, resets its peak resident set
(``/proc/self/clear_refs``), runs one batch of one mode and reports ``VmHWM - VmRSS`` from
``/proc/self/status``, i.e. the extra memory the computation needed. (Not ``resource.getrusage``:
its ``ru_maxrss`` survives ``exec``, so a spawned child reports its larger parent's peak.) On CUDA:
the allocator's peak over the call (``torch.cuda.max_memory_allocated``) minus what was allocated
before it.

Last line: ``lrp/fwdbwd=<ratio>``, the worst ratio over the batch sizes. Writes the figures to
``results/lrp_speed.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import os.path as osp
import platform
import time

import torch

try:
    from bench import common
except ImportError:  # python bench/lrp_speed.py: bench/ is sys.path[0]
    import common

REPO = common.REPO
DEFAULT_IMAGES = osp.join(REPO, '..', 'shared', 'data', 'imagenet_sample', 'val')


def fwdbwd(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(x)
    logits.gather(1, logits.detach().argmax(1, keepdim=True)).sum().backward()


def lrp(model: torch.nn.Module, x: torch.Tensor) -> None:
    from mmdet_lrpq.lrp import swin_relevance

    swin_relevance(model, x)


def _status_mib(field: str) -> float:
    with open('/proc/self/status') as f:
        line = next(line for line in f if line.startswith(field + ':'))
    return int(line.split()[1]) / 1024


def build_model(device: torch.device | None = None) -> torch.nn.Module:
    import timm

    device = device or torch.device('cpu')
    torch.manual_seed(0)  # (weights drawn on the CPU: the same model on every device)
    model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, always_partition=True)
    return model.eval().to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times cover it (no-op on the CPU)."""
    if device.type != 'cpu':
        getattr(torch, device.type).synchronize(device)


def _peak_child(mode: str, x: torch.Tensor, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    model = build_model()
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak (VmHWM) to the current resident set
    start = _status_mib('VmRSS')
    MODES[mode](model, x)
    queue.put(_status_mib('VmHWM') - start)


def peak_extra_mib(mode: str, x: torch.Tensor, model: torch.nn.Module) -> float:
    """Extra peak memory (MiB) of one call of ``mode`` on ``x``: on CUDA the allocator's peak over
    the call with ``model``; on the CPU the resident set of a fresh process (``model`` unused).

    Spawned, not forked: forking after torch's OpenMP pool has run can deadlock. Read from
    ``VmHWM``, not ``resource.getrusage``: ``ru_maxrss`` survives ``exec``, so a child would
    report its large parent's peak.
    """
    if x.device.type == 'cuda':
        synchronize(x.device)
        start = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        MODES[mode](model, x)
        synchronize(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - start) / 2**20
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    child = ctx.Process(target=_peak_child, args=(mode, x, torch.get_num_threads(), queue))
    child.start()
    value = queue.get()
    child.join()
    return value


MODES = {'fwdbwd': fwdbwd, 'lrp': lrp}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', default=DEFAULT_IMAGES, help='ImageNet-style folder (default: the shared sample)')
    parser.add_argument('--synthetic', action='store_true', help='random tensors instead of images')
    parser.add_argument('--num-images', type=int, default=16, help='images timed per batch size')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--repeats', type=int, default=3, help='runs per batch and mode; the fastest counts')
    parser.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument('--device', default='cpu', help='cpu or cuda (where the peak memory is measured)')
    parser.add_argument('--out', default=osp.join(REPO, 'results', 'lrp_speed.json'))
    args = parser.parse_args(argv)

    import timm

    from mmdet_lrpq.lrp import eval_transform, iter_images, list_images

    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = build_model(device)
    if args.synthetic:
        source = 'synthetic (torch.randn, seed 0)'
        images = torch.randn(args.num_images, 3, 224, 224)
    else:
        if not osp.isdir(args.images):
            print(f'skipped: image folder not found: {args.images} (pass --images DIR or --synthetic)')
            return {}
        items = list_images(args.images, num_images=args.num_images)
        source = f'{osp.abspath(args.images)} (first {len(items)} images, round-robin over classes)'
        images = torch.stack(list(iter_images(items, eval_transform(model))))
    images = images.to(device)

    first = images[: max(args.batch_sizes)]
    for fn in MODES.values():  # warm-up: allocator, thread pool, lazy inits
        fn(model, first[:1])
    results = {}
    print(
        f'swin_tiny_patch4_window7_224 on {device}, {torch.get_num_threads()} threads, {len(images)} images: {source}'
    )
    print(f'{"batch":>5} {"mode":>7} {"images/s":>9} {"peak MiB":>9}')
    for bs in args.batch_sizes:
        seconds = {name: 0.0 for name in MODES}
        for start in range(0, len(images), bs):
            x = images[start : start + bs]
            fastest = {name: float('inf') for name in MODES}
            for _ in range(args.repeats):
                for name, fn in MODES.items():
                    synchronize(device)
                    t0 = time.perf_counter()
                    fn(model, x)
                    synchronize(device)
                    fastest[name] = min(fastest[name], time.perf_counter() - t0)
            for name in MODES:
                seconds[name] += fastest[name]
        row = {}
        for name in MODES:
            row[name] = {
                'images_per_s': len(images) / seconds[name],
                'seconds': seconds[name],
                'peak_extra_mib': peak_extra_mib(name, first[:bs], model),
            }
            print(f'{bs:>5} {name:>7} {row[name]["images_per_s"]:>9.2f} {row[name]["peak_extra_mib"]:>9.0f}')
        row['ratio'] = seconds['lrp'] / seconds['fwdbwd']
        print(f'batch {bs}: lrp/fwdbwd={row["ratio"]:.2f}')
        results[str(bs)] = row

    report = {
        'model': 'swin_tiny_patch4_window7_224 (random weights, always_partition=True)',
        'images': source,
        'num_images': len(images),
        'repeats': args.repeats,
        'device': str(device),
        'threads': torch.get_num_threads(),
        'cpu_count': os.cpu_count(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'python': platform.python_version(),
        'memory': (
            'MiB: peak CUDA allocation over one batch minus the allocation before it'
            if device.type == 'cuda'
            else 'MiB: peak RSS (VmHWM, reset via clear_refs) of a fresh process running one batch, '
            'minus its RSS before the call'
        ),
        'batch_sizes': results,
        'worst_ratio': max(r['ratio'] for r in results.values()),
    }
    common.write_json(args.out, report, indent=2)
    print(f'lrp/fwdbwd={report["worst_ratio"]:.2f}')
    return report


if __name__ == '__main__':
    main()
