"""Makes the test guest fixtures available to the tests in this directory."""

from tests.guest.fixtures import guest_images as guest_images
