"""Memory: what a request needs, and (next) the transforms that make a model fit the device."""
