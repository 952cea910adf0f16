"""Tools for operators that ship with the gateway: a local model server for load tests."""
