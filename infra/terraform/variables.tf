# Bucket names are global across all AWS accounts: there are no defaults; pass yours (see
# terraform.tfvars.example).

variable "models_bucket" {
  description = "Existing bucket holding the unaligned and aligned models (read only)"
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.models_bucket)) && !can(regex("\\.\\.|^\\d+\\.\\d+\\.\\d+\\.\\d+$", var.models_bucket))
    error_message = "models_bucket must be an S3 bucket name: 3-63 characters of a-z, 0-9, '.', '-', starting and ending with a letter or digit, not an IP address."
  }
}

variable "adapters_bucket" {
  description = "Existing bucket holding the safety adapter and the fine-tuned adapters (read only)"
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.adapters_bucket)) && !can(regex("\\.\\.|^\\d+\\.\\d+\\.\\d+\\.\\d+$", var.adapters_bucket))
    error_message = "adapters_bucket must be an S3 bucket name: 3-63 characters of a-z, 0-9, '.', '-', starting and ending with a letter or digit, not an IP address."
  }
}

variable "merged_bucket" {
  description = "Bucket for the merged adapters, created here (the fleet config's output lives in it)"
  type        = string
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.merged_bucket)) && !can(regex("\\.\\.|^\\d+\\.\\d+\\.\\d+\\.\\d+$", var.merged_bucket))
    error_message = "merged_bucket must be an S3 bucket name: 3-63 characters of a-z, 0-9, '.', '-', starting and ending with a letter or digit, not an IP address."
  }
}

variable "oidc_provider_arn" {
  description = "The EKS cluster's IAM OIDC provider ARN"
  type        = string
}

variable "oidc_provider_url" {
  description = "The EKS cluster's OIDC issuer URL without https://"
  type        = string
}

variable "name" {
  description = "Name of the IAM role (the role ARN goes into k8s/overlays/prod/serviceaccount-irsa.yaml)"
  type        = string
  default     = "safemerge-ray"
}

variable "namespace" {
  description = "Kubernetes namespace of the Ray pods (k8s/: safemerge)"
  type        = string
  default     = "safemerge"
}

variable "service_account" {
  description = "Kubernetes ServiceAccount of the Ray pods (k8s/: safemerge-ray)"
  type        = string
  default     = "safemerge-ray"
}

variable "staged_expiration_days" {
  description = "Days after which objects still tagged safemerge-state=staged (runs that never committed) expire"
  type        = number
  default     = 7
  validation {
    condition     = var.staged_expiration_days >= 1
    error_message = "staged_expiration_days must be at least 1 (a run must be able to finish its commit)."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Days after which noncurrent object versions in the merged bucket are deleted"
  type        = number
  default     = 30
  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}
