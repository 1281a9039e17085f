"""The remote side: Productiv's API (token, signed URLs) and the PUT of each file to its storage."""
