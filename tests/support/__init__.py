"""Helpers shared by tests and benchmarks (throwaway services, fakes, fuzzers); never installed."""
