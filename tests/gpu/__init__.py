# A package, so that this folder's conftest.py does not clash with tests/conftest.py.
