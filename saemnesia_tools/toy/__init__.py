"""The toy world: procedurally rendered objects in styles, and the judges that recognise them."""
