"""Helpers shared by the tests, bench/ and docs/: data paths, small configs, servers, images."""
