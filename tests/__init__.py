"""The test suite (a package, so bench/ and docs/ can import its helpers as ``tests.support``)."""
