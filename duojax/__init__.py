from duojax.loading import load
