"""Deploying an archive on KServe: the ``InferenceService`` of the unhans predictor, built with KServe's own SDK models
(so the manifest has the CRD's schema), and the ``unhans kserve-manifest`` command that prints it.

KServe's storage initializer downloads ``storage_uri`` (the ``.mar`` from ``unhans archive``, on S3, GCS, a PVC, ...)
into ``/mnt/models`` before the predictor starts; the container (``deploy/kserve/Dockerfile``) runs
``python -m unhans.handlers.kserve_model --archive /mnt/models``, which serves the one archive it finds there.
"""

from __future__ import annotations

import click
import yaml

MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri
HTTP_PORT = 8080  # KServe's defaults for a custom predictor's REST and gRPC ports
GRPC_PORT = 8081


def inference_service(name: str, storage_uri: str, image: str, namespace: str = "default", cpu: str = "2", memory: str = "4Gi",
                      min_replicas: int = 1, max_replicas: int = 4) -> dict:
    """The InferenceService of the unhans predictor serving ``storage_uri`` as ``name``, as a plain dict."""
    from kserve import ApiClient, V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec, constants
    from kubernetes import client

    resources = client.V1ResourceRequirements(requests={"cpu": cpu, "memory": memory}, limits={"cpu": cpu, "memory": memory})
    container = client.V1Container(
        name="kserve-container", image=image,
        # all interfaces: the pod's address is not loopback (the predictor's default); the cluster's ingress guards it
        args=["--archive", MODEL_MOUNT, "--model_name", name, "--http_port", str(HTTP_PORT), "--grpc_port", str(GRPC_PORT),
              "--host", "0.0.0.0"],
        env=[client.V1EnvVar(name="STORAGE_URI", value=storage_uri),  # the storage initializer downloads it to /mnt/models
             client.V1EnvVar(name="UNHANS_SINK", value="/var/unhans-sink")],  # set a shared sink (s3://...) for the monitor
        ports=[client.V1ContainerPort(container_port=HTTP_PORT, protocol="TCP")],
        readiness_probe=client.V1Probe(http_get=client.V1HTTPGetAction(path=f"/v2/models/{name}/ready", port=HTTP_PORT)),
        resources=resources)
    service = V1beta1InferenceService(
        api_version=constants.KSERVE_V1BETA1, kind=constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=client.V1ObjectMeta(name=name, namespace=namespace, annotations={"serving.kserve.io/enable-prometheus-scraping": "true"}),
        spec=V1beta1InferenceServiceSpec(predictor=V1beta1PredictorSpec(
            containers=[container], min_replicas=min_replicas, max_replicas=max_replicas)))
    return ApiClient().sanitize_for_serialization(service)


@click.command("kserve-manifest")
@click.option("--name", required=True, help="Model name: served at /v2/models/NAME and /v1/models/NAME.")
@click.option("--storage-uri", required=True, help="Where the .mar lies: s3://bucket/vgg.mar, gs://..., pvc://claim/vgg.mar.")
@click.option("--image", required=True, help="The predictor image built from deploy/kserve/Dockerfile.")
@click.option("--namespace", default="default", show_default=True)
@click.option("--cpu", default="2", show_default=True)
@click.option("--memory", default="4Gi", show_default=True)
def kserve_manifest_command(name, storage_uri, image, namespace, cpu, memory):
    """Print the KServe InferenceService that serves an archive with the unhans predictor (kubectl apply -f -)."""
    click.echo(yaml.safe_dump(inference_service(name, storage_uri, image, namespace, cpu, memory), sort_keys=False), nl=False)
