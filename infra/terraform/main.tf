# S3 buckets and the IAM role the Ray pods assume through IRSA (k8s/serviceaccount.yaml).
# Models and adapters are read-only to the job; only the merged bucket is writable.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

variable "name" {
  type    = string
  default = "safemerge-ray"
}

variable "oidc_provider_arn" {
  description = "The EKS cluster's IAM OIDC provider ARN"
  type        = string
}

variable "oidc_provider_url" {
  description = "The EKS cluster's OIDC issuer URL without https://"
  type        = string
}

variable "buckets" {
  type = object({ models = string, adapters = string, merged = string })
  default = {
    models   = "models"
    adapters = "adapters"
    merged   = "merged"
  }
}

resource "aws_s3_bucket" "merged" {
  bucket = var.buckets.merged
}

resource "aws_s3_bucket_versioning" "merged" {
  bucket = aws_s3_bucket.merged.id
  versioning_configuration {
    status = "Enabled"
  }
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.oidc_provider_url}:sub"
      values   = ["system:serviceaccount:safemerge:safemerge-ray"]
    }
  }
}

data "aws_iam_policy_document" "access" {
  statement {
    sid       = "ListInputs"
    actions   = ["s3:ListBucket"]
    resources = [for b in [var.buckets.models, var.buckets.adapters] : "arn:aws:s3:::${b}"]
  }
  statement {
    sid       = "ReadInputObjects"
    actions   = ["s3:GetObject"]
    resources = [for b in [var.buckets.models, var.buckets.adapters] : "arn:aws:s3:::${b}/*"]
  }
  statement {
    sid       = "WriteMerged"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:ListBucket"]
    resources = [aws_s3_bucket.merged.arn, "${aws_s3_bucket.merged.arn}/*"]
  }
}

resource "aws_iam_role" "job" {
  name               = var.name
  assume_role_policy = data.aws_iam_policy_document.assume.json
}

resource "aws_iam_role_policy" "access" {
  name   = "${var.name}-s3"
  role   = aws_iam_role.job.id
  policy = data.aws_iam_policy_document.access.json
}

output "role_arn" {
  description = "Put this in k8s/serviceaccount.yaml's eks.amazonaws.com/role-arn annotation"
  value       = aws_iam_role.job.arn
}
