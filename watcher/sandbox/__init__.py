"""A local stand-in for Productiv's push API and its storage, for the demo and the tests."""
