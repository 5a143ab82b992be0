"""Task stores: the interface every store implements, and the stores themselves."""
