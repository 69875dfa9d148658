import pytest

from prefvec_ds.distributed.zero_sizing import resolve_zero_auto


def test_auto_zero_sizes_follow_the_hidden_size():
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto",
                                "sub_group_size": 1e8}}
    zero = resolve_zero_auto(ds, 8192)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 8192 * 8192
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 8192 * 8192)
    assert zero["stage3_param_persistence_threshold"] == 81920
    assert zero["sub_group_size"] == 1e8
    assert ds["zero_optimization"]["reduce_bucket_size"] == "auto"  # input left alone


def test_auto_buckets_of_a_small_model_are_floored():
    ds = {"zero_optimization": {"reduce_bucket_size": "auto",
                                "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto"}}
    zero = resolve_zero_auto(ds, 256)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 50_000_000
    assert zero["stage3_prefetch_bucket_size"] == 20_000_000
    assert zero["stage3_param_persistence_threshold"] == 2560


def test_numbers_pass_through_and_unresolvable_auto_is_an_error():
    ds = {"zero_optimization": {"reduce_bucket_size": 5e7}}
    assert resolve_zero_auto(ds, None) == ds
    with pytest.raises(ValueError, match="stage3_max_live_parameters"):
        resolve_zero_auto({"zero_optimization": {"stage3_max_live_parameters": "auto"}}, 512)
    with pytest.raises(ValueError, match="hidden_size=None"):
        resolve_zero_auto({"zero_optimization": {"reduce_bucket_size": "auto"}}, None)
