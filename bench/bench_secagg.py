"""Secure-aggregation cost, side by side with plaintext summation, the cipher alone and CKKS.

For each vector size (ViT-S 22M, ViT-B MAE 112M parameters) and number of sites it runs a real
round (X25519 keys, Shamir shares, AES-GCM, masks) and reports:

- per-site time of the masked-input step (decrypt shares, quantise, add n keystreams: 1 self
  mask + n - 1 pairwise), its parts, and the ratio of the keystream bound to it: the time the
  cipher alone needs to produce the same n * (d + 4) * 4 mask bytes (goal >= 0.5);
- server time (sum the n masked vectors + reconstruct and remove the masks), and its ratio to
  plaintext float32 summation of the same n vectors;
- bytes on the wire of one masked input relative to float32 (goal <= 1.0 with a 32-bit ring);
- if TenSEAL is installed, FLARE's CKKS setting (N=8192, [60, 40, 40], scale 2^40, 4096 slots
  per ciphertext) on a sample of the vector, extrapolated linearly to the full size; the server
  is timed as FLARE's HE aggregator works (each ciphertext deserialised once and added into the
  running sum, each encrypted layer's context deserialised, one final scaling; see ``ckks``);
  decryption at the sites is not counted.

Times are CPU seconds of this process (all timed work is single-threaded; TenSEAL is run with
its default threads, so its CPU time may exceed its wall time). TenSEAL is not a dependency:
``pip install tenseal`` for the CKKS rows. Defaults finish in about two minutes on a 2-core CPU;
the full table:
    .venv/bin/python bench/bench_secagg.py --sizes 22M,112M --sites 3,8,16 --repeats 3 --ckks-sample 262144
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time

import numpy as np

from ultrafedfm.secagg import (
    ContributionLedger, Membership, RoundFigures, SecAggClient, SecAggConfig, SecAggServer, SiteSigningKey,
    simulate_round, to_bytes,
)
from ultrafedfm.secagg.simulation import SIMULATED_CONTEXT
from ultrafedfm.secagg.masks import CHUNK_ELEMENTS, MaskStream, apply_streams, keystream_bytes
from ultrafedfm.secagg.quantize import StochasticEncoder

_logger = logging.getLogger("bench_secagg")

SIZES = {"1M": 1_000_000, "4M": 4_000_000, "22M": 22_000_000, "86M": 86_000_000, "112M": 112_000_000}


def make_consortium(n: int) -> tuple[Membership, dict[str, SiteSigningKey]]:
    """n sites with their own Ed25519 signing keys and the member list that pins them."""
    signers = {f"site-{i:02d}": SiteSigningKey.generate(site=f"site-{i:02d}") for i in range(n)}
    return Membership.of("bench", 1, {s: k.public_key for s, k in signers.items()}), signers


def timed(fn, *args, **kwargs):
    """(result, CPU seconds of this process). Everything timed is single-threaded, so CPU time equals
    wall time on an idle machine and is not inflated by other jobs sharing the cores."""
    start = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - start


def quantize_only(delta: np.ndarray, config: SecAggConfig) -> None:
    out = np.empty(delta.shape[0], dtype=np.uint32)
    encoder = StochasticEncoder(clip=config.clip, frac_bits=config.frac_bits, chunk_elements=CHUNK_ELEMENTS)
    for start in range(0, delta.shape[0], CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, delta.shape[0])
        encoder.encode_into(delta[start:stop], out[start:stop])


def best_of(repeats: int, fn, *args, **kwargs) -> float:
    return min(timed(fn, *args, **kwargs)[1] for _ in range(repeats))


def streams_only(vector: np.ndarray, n: int, prg: str) -> None:
    """Add n keystreams into a ring vector: the masking step without quantisation."""
    streams = [MaskStream(os.urandom(32), sign=1 if i % 2 else -1, prg=prg) for i in range(n)]
    apply_streams(vector, streams)


def plaintext_sum(delta: np.ndarray, n: int) -> None:
    acc = np.zeros_like(delta)
    for _ in range(n):
        np.add(acc, delta, out=acc)


def run_secagg(d: int, n: int, delta: np.ndarray, config: SecAggConfig) -> dict:
    members, sites = make_consortium(n)
    clients = {s: SecAggClient(signer=i, members=members, job_id="bench", round_number=1, config=config,
                               context=SIMULATED_CONTEXT, ledger=ContributionLedger.in_memory())
               for s, i in sites.items()}
    server = SecAggServer(members=members, job_id="bench", round_number=1, config=config, context=SIMULATED_CONTEXT)
    start = time.process_time()
    for c in clients.values():
        server.receive_advertisement(c.advertise_keys())
    roster = server.key_roster()
    for c in clients.values():
        server.receive_encrypted_shares(c.share_keys(roster))
    deliveries = server.share_deliveries()
    setup = time.process_time() - start
    mask_times, server_time, wire_bytes = [], 0.0, 0
    for s, c in clients.items():
        masked, t = timed(c.mask_input, deliveries[s], delta=delta, weight=1.0,
                          figures=RoundFigures(loss=0.5, steps=1, num_samples=1), trained_with=SIMULATED_CONTEXT)
        mask_times.append(t)
        if not wire_bytes:
            wire_bytes = len(to_bytes(masked))
        _, t = timed(server.receive_masked_input, masked)
        server_time += t
        del masked
    survivor_list = server.survivor_list()
    for s in survivor_list.survivors:
        server.receive_survivor_signature(clients[s].sign_survivors(survivor_list))
    request = server.unmask_request()
    for s in request.survivors:
        server.receive_unmask_response(clients[s].unmask(request))
    result, t = timed(server.aggregate)
    server_time += t
    mean, t = timed(result.mean_delta)
    server_time += t
    error = float(np.max(np.abs(mean[:: max(1, d // 1_000_000)] - delta[:: max(1, d // 1_000_000)])))
    return {"setup": setup, "mask": float(np.median(mask_times)), "server": server_time, "wire": wire_bytes,
            "error": error}


def ckks(d: int, sample: int, layers: int) -> dict | None:
    """FLARE's CKKS setting on ``sample`` values, per 4096-slot ciphertext, scaled to ``d`` values.

    The server side is timed as FLARE 2.9 aggregates (``HEInTimeAccumulateWeightedAggregator`` over
    FOBS): each site's encrypted layer arrives as one CKKSVector with its TenSEAL context beside it
    (``CKKSVectorDecomposer.recompose``: ``ts.context_from`` then ``ts.ckks_vector_from``, once per
    layer and per ciphertext), the first site's vectors start the running sum and every later
    site's are added into it (``WeightedAggregationHelper.add``), and the sum is scaled once by
    1 / (sum of weights) at the end (``get_result``). Sites weight their values before encrypting.
    """
    try:
        import tenseal as ts
    except ImportError:
        return None
    # FLARE's HEBuilder: symmetric CKKS, relinearisation keys, scale 2^40.
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.generate_relin_keys()
    ctx.global_scale = 2**40
    slots = 4096
    values = np.random.default_rng(0).standard_normal(sample) * 1e-3
    blobs, t_enc = timed(lambda: [ts.ckks_vector(ctx, values[i:i + slots]).serialize()
                                  for i in range(0, sample, slots)])
    # What FOBS sends (and the server deserialises) beside each encrypted layer: the vector's context.
    layer_context = ts.ckks_vector(ctx, values[:slots]).context().serialize()

    def receive(total: list | None) -> list:
        """One site's ciphertexts, each deserialised once, added into the running sum (if any)."""
        received = [ts.ckks_vector_from(ctx, blob) for blob in blobs]
        return received if total is None else [t + v for t, v in zip(total, received)]

    total, t_first = timed(receive, None)
    adds, twice = [], []
    for _ in range(3):  # interleaved with this table's earlier method: two deserialisations and an add
        total, t = timed(receive, total)
        adds.append(t)
        twice.append(timed(lambda: [ts.ckks_vector_from(ctx, b) + ts.ckks_vector_from(ctx, b) for b in blobs])[1])
    t_add, t_twice = min(adds), min(twice)
    probes = 5
    _, t_context = timed(lambda: [ts.context_from(layer_context) for _ in range(probes)])
    _, t_scale = timed(lambda: [t * (1.0 / 2) for t in total])
    scale = d / sample
    return {"encrypt": t_enc * scale, "first_site": t_first * scale, "add_site": t_add * scale,
            "context": t_context / probes * layers, "final_scale": t_scale * scale, "layers": layers,
            "wire": sum(map(len, blobs)) * scale, "context_bytes": len(layer_context) * layers,
            "ms_per_ciphertext": 1e3 * t_add / len(blobs), "ms_per_ciphertext_twice": 1e3 * t_twice / len(blobs)}


def parameter_tensors(d: int) -> int:
    """Tensors of the model of ``d`` parameters (FLARE encrypts each as one CKKSVector)."""
    import torch

    from ultrafedfm.models import build_mae

    preset = {22_000_000: "small", 112_000_000: "base"}.get(d)
    if preset is None:  # other sizes: the ViT-B MAE's tensor count
        preset = "base"
    with torch.device("meta"):
        return len(list(build_mae(preset=preset).parameters()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="22M", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--sites", default="3,8,16", help="comma-separated site counts")
    parser.add_argument("--prg", default="aes-256-ctr", choices=["aes-256-ctr", "chacha20"])
    parser.add_argument("--repeats", type=int, default=2, help="best-of repeats for the component timings")
    parser.add_argument("--ckks-sample", type=int, default=1 << 19, help="CKKS sample size (0 = skip CKKS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = [SIZES[s] for s in args.sizes.split(",")]
    site_counts = [int(s) for s in args.sites.split(",")]
    config = SecAggConfig(max_sites=max(max(site_counts), 3), prg=args.prg)
    import cryptography
    from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend

    print(f"# secagg bench: ring {config.ring_bits} bits, frac_bits {config.frac_bits}, prg {config.prg}, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}, numpy {np.__version__}, "
          f"cryptography {cryptography.__version__} ({openssl_backend.openssl_version_text()})")
    header = ("params", "sites", "site step s", "quantise s", "mask s", "cipher-only s", "cipher/mask",
              "cipher/site step", "server s", "plain sum s", "server/plain", "wire/f32", "max err")
    print(" | ".join(header))
    rows_ckks = []
    for d in sizes:
        delta = (np.random.default_rng(1).standard_normal(d) * 1e-3).astype(np.float32)
        t_quant = best_of(args.repeats, quantize_only, delta, config)
        c = ckks(d, min(args.ckks_sample, d), parameter_tensors(d)) if args.ckks_sample else None
        for n in site_counts:
            r = run_secagg(d, n, delta, config)
            t_mask = best_of(args.repeats, streams_only, np.zeros(d + 4, dtype=np.uint32), n, config.prg)
            t_ks = best_of(args.repeats, keystream_bytes, os.urandom(32), n * (d + 4) * 4, prg=config.prg)
            t_plain = best_of(args.repeats, plaintext_sum, delta, n)
            cells = (f"{d / 1e6:.0f}M", n, f"{r['mask']:.2f}", f"{t_quant:.2f}", f"{t_mask:.2f}", f"{t_ks:.2f}",
                     f"{t_ks / t_mask:.2f}", f"{t_ks / r['mask']:.2f}", f"{r['server']:.2f}",
                     f"{t_plain:.2f}", f"{r['server'] / t_plain:.1f}", f"{r['wire'] / (4 * d):.6f}",
                     f"{r['error']:.1e}")
            print(" | ".join(map(str, cells)), flush=True)
            gc.collect()
            if c is not None:
                rows_ckks.append((d, n, c, r))
        del delta
        gc.collect()
    print("# bytes one site sends per round besides its masked input (Ed25519 site keys)")
    for n in site_counts:
        members, sites = make_consortium(n)
        zeros = {name: np.zeros(16, np.float32) for name in sites}
        report = simulate_round(signers=sites, members=members, deltas=zeros, weights=dict.fromkeys(sites, 1.0),
                                config=config)
        sent = report.bytes_sent[sorted(sites)[0]]
        extra = {phase: b for phase, b in sent.items() if phase != "masked_input"}
        print(f"{n} sites: " + ", ".join(f"{phase} {b / 1024:.1f} KiB" for phase, b in extra.items())
              + f"; total {sum(extra.values()) / 1024:.1f} KiB")
    if args.ckks_sample:
        if not rows_ckks:
            print("# CKKS: tenseal is not installed; no comparison")
        else:
            print(f"# CKKS (FLARE HE defaults), measured on {args.ckks_sample} values, extrapolated linearly; server as "
                  "FLARE's HE aggregator: each ciphertext deserialised once and added into the running sum, one "
                  "context deserialised per encrypted layer and site, one final scaling")
            print("params | sites | layers | encrypt s/site | / secagg site step | server s | of which contexts s | "
                  "of which final scale s | / secagg server | wire/f32 | with contexts/f32")
            for d, c in {d: c for d, _, c, _ in rows_ckks}.items():
                print(f"# {d / 1e6:.0f}M, per ciphertext: one deserialisation + add into the sum "
                      f"{c['ms_per_ciphertext']:.2f} ms; two deserialisations + add (the earlier method) "
                      f"{c['ms_per_ciphertext_twice']:.2f} ms ({c['ms_per_ciphertext_twice'] / c['ms_per_ciphertext']:.1f}x)")
            for d, n, c, r in rows_ckks:
                server = c["first_site"] + (n - 1) * c["add_site"] + n * c["context"] + c["final_scale"]
                print(f"{d / 1e6:.0f}M | {n} | {c['layers']} | {c['encrypt']:.1f} | {c['encrypt'] / r['mask']:.0f} | "
                      f"{server:.1f} | {n * c['context']:.1f} | {c['final_scale']:.1f} | {server / r['server']:.0f} | "
                      f"{c['wire'] / (4 * d):.1f} | {(c['wire'] + c['context_bytes']) / (4 * d):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
