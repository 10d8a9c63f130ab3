"""``optimize``: the search for the fastest artifact that keeps the user's task, over recipes and students."""
