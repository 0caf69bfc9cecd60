"""Pytest fixtures for tests that boot the tiny real test guest."""

import pytest

from tests.guest.build import GuestImages, build_images, default_cache_dir


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    """The test guest's BIOS and UEFI images, built once (or found in the cache) per session."""
    return build_images(default_cache_dir())
