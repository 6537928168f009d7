"""Prices and GPU counts: override, spot price history, the on-demand table."""

from __future__ import annotations

import pytest

from orchestrator.config import GpuSpec
from orchestrator.providers.aws import GPU_COUNT, ON_DEMAND_USD
from orchestrator.providers.base import ProviderError
from tests.aws.aws_support import candidate, ec2_error, ec2_ok, inject

EMPTY_HISTORY = (
    '<?xml version="1.0" encoding="UTF-8"?><DescribeSpotPriceHistoryResponse '
    'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r</requestId>'
    "<spotPriceHistorySet/></DescribeSpotPriceHistoryResponse>"
)


def _history(*rows: tuple[str, str, str]) -> str:
    items = "".join(
        f"<item><instanceType>g4dn.xlarge</instanceType><productDescription>Linux/UNIX"
        f"</productDescription><spotPrice>{price}</spotPrice><timestamp>{ts}</timestamp>"
        f"<availabilityZone>{az}</availabilityZone></item>"
        for az, price, ts in rows
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><DescribeSpotPriceHistoryResponse '
        'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r</requestId>'
        f"<spotPriceHistorySet>{items}</spotPriceHistorySet></DescribeSpotPriceHistoryResponse>"
    )


def test_override_wins_without_any_call(provider):
    assert provider.price_per_hour(candidate(price_per_hour=0.33)) == 0.33
    assert provider.price_per_hour(candidate(spot=False, price_per_hour=0.44)) == 0.44
    assert sum(provider.api_calls.values()) == 0


def test_spot_price_from_history(provider):
    # moto serves a fixed history price for every offered type.
    assert provider.price_per_hour(candidate()) == pytest.approx(0.00001)
    assert provider.api_calls["describe_spot_price_history"] == 1


def test_spot_price_is_cached_on_the_clock(provider, clock):
    provider.price_per_hour(candidate())
    clock.advance(599)
    provider.price_per_hour(candidate())
    assert provider.api_calls["describe_spot_price_history"] == 1
    clock.advance(2)
    provider.price_per_hour(candidate())
    assert provider.api_calls["describe_spot_price_history"] == 2


def test_spot_price_takes_latest_per_zone_and_dearest_zone(provider):
    inject(
        provider,
        "DescribeSpotPriceHistory",
        lambda req: ec2_ok(
            _history(
                ("us-east-1a", "0.20", "2026-01-01T00:00:00.000Z"),
                ("us-east-1a", "0.15", "2025-12-31T23:00:00.000Z"),
                ("us-east-1b", "0.25", "2025-12-31T22:00:00.000Z"),
                ("us-east-1b", "0.18", "2026-01-01T00:00:00.000Z"),
            )
        ),
    )
    assert provider.price_per_hour(candidate()) == pytest.approx(0.20)


def test_empty_history_falls_back_to_on_demand(provider):
    inject(provider, "DescribeSpotPriceHistory", lambda req: ec2_ok(EMPTY_HISTORY))
    assert provider.price_per_hour(candidate()) == ON_DEMAND_USD["g4dn.xlarge"]


def test_history_failure_falls_back_to_on_demand(provider):
    denied = ec2_error("UnauthorizedOperation", 403)
    inject(provider, "DescribeSpotPriceHistory", lambda req: denied)
    assert provider.price_per_hour(candidate()) == ON_DEMAND_USD["g4dn.xlarge"]


def test_on_demand_from_table(provider):
    assert provider.price_per_hour(candidate(spot=False)) == 0.526
    assert provider.price_per_hour(candidate(spot=False, instance_type="p4d.24xlarge")) > 20
    assert provider.api_calls["describe_spot_price_history"] == 0


def test_unknown_on_demand_type_is_a_clear_error(provider):
    with pytest.raises(ProviderError, match="price_per_hour"):
        provider.price_per_hour(candidate(spot=False, instance_type="x9.huge"))


def test_unknown_spot_type_without_history_is_a_clear_error(provider):
    inject(provider, "DescribeSpotPriceHistory", lambda req: ec2_ok(EMPTY_HISTORY))
    with pytest.raises(ProviderError, match="price_per_hour"):
        provider.price_per_hour(candidate(instance_type="x9.huge"))


def test_expected_gpus(provider):
    assert provider.expected_gpus(candidate()) == 1
    assert provider.expected_gpus(candidate(instance_type="g4dn.12xlarge")) == 4
    assert provider.expected_gpus(candidate(instance_type="p4d.24xlarge")) == 8
    assert provider.expected_gpus(candidate(instance_type="c5.large")) == 0
    gpu = GpuSpec(type="nvidia-tesla-t4", count=2)
    assert provider.expected_gpus(candidate(instance_type="c5.large", gpu=gpu)) == 2


def test_every_priced_type_has_a_gpu_count():
    assert set(ON_DEMAND_USD) == set(GPU_COUNT)
    assert all(p > 0 for p in ON_DEMAND_USD.values())
