"""The test suite as a package: a regular ``tests`` package here takes precedence over any other
top-level ``tests`` package on the path (torchstain 1.4.1, a dependency, installs one into
site-packages), so ``from tests.teachers.toydata import ...`` finds ours."""
