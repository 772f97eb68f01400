terraform {
  required_version = ">= 1.6.0"

  # Exact pins: a provider upgrade is a reviewed change, not a side effect of `terraform init`.
  required_providers {
    kind = {
      source  = "tehcyx/kind"
      version = "0.9.0"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "2.17.0"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "2.36.0"
    }
    kubectl = {
      # Applies the RayCluster/RayService manifests without needing their CRDs at plan time.
      source  = "alekc/kubectl"
      version = "2.1.3"
    }
    random = {
      source  = "hashicorp/random"
      version = "3.7.2"
    }
  }
}
