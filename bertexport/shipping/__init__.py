"""What runs on the device, without torch: the artifact runtime, packs, signatures, bulk inference and ``serve``."""
