"""ZeRO sizes that ds_configs/ may leave as "auto", resolved from the model's hidden size."""

from __future__ import annotations

# ZeRO-3 sizes that ds_configs/ may leave as "auto", from the hidden size h: the HF DeepSpeed
# integration's rules (a reduce bucket of one h x h matrix, prefetch of 0.9 of one, parameters
# under 10 h elements - norms, biases - kept whole on every rank instead of gathered layer by
# layer: tiny collectives cost latency, not bandwidth), with the buckets floored at the fixed
# sizes used before (5e7 / 2e7 elements). Without the floor a small model's buckets are tiny
# (65,536 elements at h = 256): its gradient reduction became ~70 reduce-scatters per step
# instead of one, and a 2-rank CPU step of a 28M Llama took 1.8x as long (torch.profiler).
BUCKET_FLOOR = {"reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 20_000_000}
ZERO_AUTO = {"reduce_bucket_size": lambda h: max(h * h, BUCKET_FLOOR["reduce_bucket_size"]),
             "stage3_prefetch_bucket_size":
                 lambda h: max(int(0.9 * h * h), BUCKET_FLOOR["stage3_prefetch_bucket_size"]),
             "stage3_param_persistence_threshold": lambda h: 10 * h}


def resolve_zero_auto(ds_config: dict, hidden_size: int | None) -> dict:
    """ds_config with its "auto" ZeRO sizes replaced by ZERO_AUTO of the model's hidden size."""
    zero = dict(ds_config.get("zero_optimization", {}))
    for key, rule in ZERO_AUTO.items():
        if zero.get(key) == "auto" and hidden_size:
            zero[key] = rule(hidden_size)
    left = sorted(k for k, v in zero.items() if v == "auto")
    if left:
        raise ValueError(f"ds_config zero_optimization: cannot resolve 'auto' for "
                         f"{', '.join(left)} (resolved: {', '.join(ZERO_AUTO)}, from the "
                         f"model's hidden_size={hidden_size})")
    return {**ds_config, "zero_optimization": zero}
