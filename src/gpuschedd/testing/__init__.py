"""Test fakes that the daemon itself can load (the systemd sandbox tests run the real daemon against a fake
GPU). Nothing here is used unless GPUSCHED_FAKE_GPU_DIR is set; never set it in production."""

FAKE_GPU_ENV = "GPUSCHED_FAKE_GPU_DIR"
