"""Simulated data for the demo and the tests: low-dose CT slices with readers' scores, distorted natural images."""
