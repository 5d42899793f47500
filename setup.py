from setuptools import find_namespace_packages, setup

# The manifest tools live in the folder manifests/ but install as siamctc_manifests: a top-level
# package called manifests would collide with the folder of that name a user creates for their data.
setup(
    packages=find_namespace_packages(include=["fairseq_siamctc", "fairseq_siamctc.*", "hydra_plugins", "hydra_plugins.*"])
    + ["siamctc_manifests"],
    package_dir={"siamctc_manifests": "manifests"},
)
