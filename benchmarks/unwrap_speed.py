"""Speed of qsmprep's ROMEO unwrapping against scikit-image, and a whole-head
4-echo B0 map (time and peak memory).

1. One 160x192x128 echo of a smooth field with many wraps and noise: qsmprep's
   ``romeo_unwrap`` vs ``skimage.restoration.unwrap_phase`` in one process,
   median of ``--repeats`` runs after one warm-up, and the fraction of object
   voxels each unwraps to a wrong 2 pi multiple.
2. A 4-echo 224x224x160 dataset unwrapped (template mode) and combined into a
   B0 map with ``romeo_b0``, with and without MCPC-3D-S, each in a fresh
   process so that its peak resident memory (``ru_maxrss``) is its own.

Writes the table between ``<!-- unwrap_speed:start -->`` and
``<!-- unwrap_speed:end -->`` in docs/benchmarks.md.

Usage: ``python benchmarks/unwrap_speed.py [--repeats 5] [--quick]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, hardware, hardware_note, markdown_table, publish  # noqa: E402

SECTION = "unwrap_speed"
SNR_SINGLE, SNR_MULTI = 15.0, 30.0  # first-echo signal / noise std per channel
TWO_PI = 2 * np.pi


def head_like(shape, echo_times_s, *, amplitude_hz=250.0, snr=30.0, t2star_s=0.04, seed=0):
    """Ellipsoidal object in a smooth field (quadratic + Gaussian blobs, Hz).

    Returns wrapped phase and magnitude (X, Y, Z, E), field (Hz) and object mask.
    """
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    field = 0.7 * x**2 + 0.5 * y**2 - 0.6 * y * z + 0.5 * z - 0.3 * x * z
    for _ in range(8):
        c = rng.uniform(-0.6, 0.6, 3).astype(np.float32)
        s = np.float32(rng.uniform(0.08, 0.25))
        field = field + np.float32(rng.uniform(-0.4, 0.4)) * np.exp(
            -((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    mask = (x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2 < 1
    field = (amplitude_hz * (field - np.median(field[mask])) / np.abs(field[mask]).max()).astype(np.float32)
    te = np.asarray(echo_times_s, dtype=np.float32)
    phase = np.empty(shape + (te.size,), dtype=np.float32)
    mag = np.empty_like(phase)
    for e, t in enumerate(te):
        signal = mask * np.float32(np.exp(-(t - te[0]) / t2star_s)) * np.exp(
            1j * (TWO_PI * t * field)).astype(np.complex64)
        signal += (rng.standard_normal(shape, dtype=np.float32)
                   + 1j * rng.standard_normal(shape, dtype=np.float32)) / np.float32(snr)
        phase[..., e] = np.angle(signal)
        mag[..., e] = np.abs(signal)
    return phase, mag, field, mask


def wrong_voxels(unwrapped, truth, mask):
    """Number of mask voxels whose 2 pi multiple differs from the most common one."""
    k = np.rint((unwrapped - truth) / TWO_PI)[mask].astype(np.int64)
    return int(k.size - np.bincount(k - k.min()).max())


def median_time(func, repeats):
    """Median wall and CPU times (s) of ``repeats`` calls after a warm-up; the last result.

    CPU time (all threads of this process) shows the work done even when other
    jobs share the cores and stretch the wall time.
    """
    result = func()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = func()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu), result


def single_echo(shape, repeats):
    from skimage.restoration import unwrap_phase

    from qsmprep.qsm.romeo import romeo_unwrap

    te = 0.02
    phase, mag, field, mask = head_like(shape, [te], snr=SNR_SINGLE)
    phase, mag, truth = phase[..., 0], mag[..., 0], TWO_PI * te * field
    romeo_unwrap(phase[:8, :8, :8], magnitude=mag[:8, :8, :8])  # numba compilation (cached)
    t_romeo, c_romeo, (u_romeo, _) = median_time(lambda: romeo_unwrap(phase, magnitude=mag), repeats)
    t_sk, c_sk, u_sk = median_time(lambda: unwrap_phase(phase), repeats)
    wraps = float(np.abs(truth[mask]).max() / np.pi)
    return {
        "shape": list(shape), "max_abs_phase_over_pi": wraps, "object_voxels": int(mask.sum()),
        "romeo_s": t_romeo, "romeo_cpu_s": c_romeo, "romeo_wrong": wrong_voxels(u_romeo, truth, mask),
        "skimage_s": t_sk, "skimage_cpu_s": c_sk, "skimage_wrong": wrong_voxels(u_sk, truth, mask),
    }


def _multi_echo_worker(path, mcpc, queue):
    """Unwrap + B0 on the saved dataset; report time, peak RSS and B0 error."""
    from qsmprep.qsm.echo import romeo_b0
    from qsmprep.qsm.romeo import romeo_unwrap
    from qsmprep.qsm.unwrap import mcpc3ds

    data = np.load(path)
    phase, mag, te, field, mask = (data[k] for k in ("phase", "mag", "te", "field", "mask"))
    romeo_unwrap(phase[:8, :8, :8], magnitude=mag[:8, :8, :8], echo_times_s=te)  # compile / load cache
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu = time.perf_counter(), time.process_time()
    if mcpc:
        phase, _ = mcpc3ds(phase, mag, te, voxel_size_mm=(1.0, 1.0, 1.0))
    unwrapped, _ = romeo_unwrap(phase, magnitude=mag, echo_times_s=te)
    b0 = romeo_b0(unwrapped, mag, te)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    err = (b0 - field)[mask]
    queue.put({
        "seconds": seconds, "cpu_s": cpu, "peak_rss_gb": peak / 2**20, "rss_before_gb": rss_before / 2**20,
        "b0_rmse_hz": float(np.sqrt(np.mean(err**2))), "b0_wrong": int(np.sum(np.abs(err) > 10)),
        "object_voxels": int(mask.sum()),
    })


def multi_echo(shape):
    te = np.array([0.004, 0.008, 0.012, 0.016], dtype=np.float32)
    phase, mag, field, mask = head_like(shape, te, amplitude_hz=250.0, snr=SNR_MULTI, seed=1)
    out = {"shape": list(shape) + [len(te)]}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, phase=phase, mag=mag, te=te, field=field, mask=mask)
        del phase, mag
        for mcpc in (False, True):
            queue = ctx.Queue()
            proc = ctx.Process(target=_multi_echo_worker, args=(str(path), mcpc, queue))
            proc.start()
            out["mcpc3ds" if mcpc else "romeo"] = queue.get()
            proc.join()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median), after one warm-up")
    parser.add_argument("--quick", action="store_true", help="half-size volumes (a smoke test)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ untouched")
    args = parser.parse_args(argv)
    div = 2 if args.quick else 1
    single = single_echo((160 // div, 192 // div, 128 // div), args.repeats)
    multi = multi_echo((224 // div, 224 // div, 160 // div))
    info = hardware()

    s, r, m = single, multi["romeo"], multi["mcpc3ds"]
    one = f"1 echo {'×'.join(map(str, s['shape']))}"
    four = f"4 echoes {'×'.join(map(str, multi['shape'][:3]))}"
    rows = [
        [one, "qsmprep ROMEO (numba)", fmt(s["romeo_s"], 2), fmt(s["romeo_cpu_s"], 2),
         str(s["romeo_wrong"]), "–"],
        [one, "skimage unwrap_phase", fmt(s["skimage_s"], 2), fmt(s["skimage_cpu_s"], 2),
         str(s["skimage_wrong"]), "–"],
        [four, "ROMEO + B0 (romeo_b0)", fmt(r["seconds"], 2), fmt(r["cpu_s"], 2),
         str(r["b0_wrong"]), fmt(r["peak_rss_gb"], 2)],
        [four, "MCPC-3D-S + ROMEO + B0", fmt(m["seconds"], 2), fmt(m["cpu_s"], 2),
         str(m["b0_wrong"]), fmt(m["peak_rss_gb"], 2)],
    ]
    table = markdown_table(
        ["data", "method", "wall time (s)", "CPU time (s)", "wrong voxels", "peak RSS (GB)"], rows)
    speedup = s["skimage_s"] / s["romeo_s"]
    body = (
        "## Phase unwrapping speed\n\n"
        "Generated by `benchmarks/unwrap_speed.py`"
        f"{' --quick' if args.quick else ''}. Smooth field (quadratic + Gaussian blobs) over an "
        f"ellipsoidal object with complex noise, phase up to {s['max_abs_phase_over_pi']:.1f}π. "
        f"Single echo (TE 20 ms, SNR {SNR_SINGLE:.0f}): median of {args.repeats} runs after a "
        "warm-up, both methods on the whole volume (ROMEO also gets the magnitude); wrong voxels = object voxels (of "
        f"{s['object_voxels']}) unwrapped to a different 2π multiple than the majority; ROMEO was {speedup:.1f}× faster (wall). "
        "CPU time counts all threads of the process (numba uses both cores for the edge "
        f"weights). Four echoes (TE 4/8/12/16 ms, SNR {SNR_MULTI:.0f}): template-mode "
        "ROMEO then the phase-SNR weighted B0 combination, one run in a fresh process; wrong "
        f"voxels = object voxels (of {r['object_voxels']}) with a B0 error > 10 Hz; peak RSS is the whole process's (Python, libraries and the "
        f"{4 * np.prod(multi['shape']) * 2 / 1e9:.2f} GB of float32 input included).\n\n"
        + table + "\n" + hardware_note(info) + "\n"
    )
    print(body)
    if not args.no_write:
        publish(SECTION, body, {"single_echo": single, "multi_echo": multi,
                                "hardware": info, "quick": args.quick})


if __name__ == "__main__":
    main()
