"""Long-video benchmark evaluation: task formats (`tasks`) and the resumable harness (`harness`)."""
